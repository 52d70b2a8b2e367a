"""Stage 2: fMRI rows paired with cached targets, the adapters, training and fit-adapters."""
