"""fMRI -> CLIP-target regressors (stage 2): ridge, BrainMCLIP, Lite-Mind."""
