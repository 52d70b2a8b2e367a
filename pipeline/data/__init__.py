"""NSD and cc2017 on disk: the readers and prepare-fmri / prepare-video-fmri (the fMRI caches); the
demo look-alikes that imitate them are in :mod:`pipeline.demo`."""
