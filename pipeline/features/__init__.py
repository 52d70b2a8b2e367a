"""Stage 1: CLIP models, layer/token specs and extract-clip (the features cache)."""
