"""Image arrays as the project passes them around: (N, H, W, 3) RGB, uint8 (0..255) or float (0..1).

A base module: decoding writes reconstructions and evaluation scores them, so the conversion both
use lives below both layers.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError


def as_float_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """(N, H, W, 3) uint8 (0..255) or float (0..1) -> float64 in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise UserError(f"{what}: expected (N, H, W, 3) RGB images, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"{what}: expected uint8 or float images, got {arr.dtype}")
    return arr.astype(np.float64)
