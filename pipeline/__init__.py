"""fMRI -> image decoding on NSD through a two-stage feature cache.

The data flows one way, and so do the imports: a module imports from its own layer and the layers
numbered before it, never from a later one (tests/test_conventions.py reads this list and checks every
import, those inside functions included):

1. base utilities, the modules directly in :mod:`pipeline` (errors, store, device, images, hub, ...);
2. :mod:`pipeline.data`: NSD (or cc2017) on disk and the fMRI caches (:mod:`pipeline.data.fmri`);
3. :mod:`pipeline.features`: the CLIP feature caches;
4. :mod:`pipeline.fitting`: adapters from fMRI to CLIP features;
5. :mod:`pipeline.decoding`: reconstructions;
6. :mod:`pipeline.evaluation`: metrics;
7. :mod:`pipeline.analysis`: layer analyses, which read the caches directly;
8. :mod:`pipeline.demo`: the demo look-alikes, whose planted encoding models run the project's CLIP
   code (:mod:`pipeline.features.clip`).

The stages (``stages/``, ``cli.py``), the benchmarks and the tests use the package; no module of it
imports them.
"""

__version__ = "0.1.0"
