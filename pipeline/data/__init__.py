"""NSD on disk: the reader, prepare-fmri (the fMRI cache) and the demo look-alike."""
