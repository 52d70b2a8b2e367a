"""fMRI -> image decoding on NSD through a two-stage feature cache.

The data flows one way: NSD (or cc2017) on disk (:mod:`pipeline.data`) -> feature caches
(:mod:`pipeline.data.fmri`, :mod:`pipeline.features`) -> adapters (:mod:`pipeline.fitting`) ->
reconstructions (:mod:`pipeline.decoding`) -> metrics (:mod:`pipeline.evaluation`); the layer
analyses (:mod:`pipeline.analysis`) read the caches directly.
"""

__version__ = "0.1.0"
