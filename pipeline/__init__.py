"""fMRI -> image decoding on NSD through a two-stage feature cache.

The data flows one way: NSD on disk (:mod:`pipeline.nsd`) -> caches
(:mod:`pipeline.fmri`, :mod:`pipeline.clip`) -> adapters -> reconstructions -> metrics.
"""

__version__ = "0.1.0"
