"""Release images -> the pixels the CLIP model sees.

:func:`to_pixels` feeds an image whose size is already the model's input size straight to the
model's normalisation (open_clip's transform would resize 224 -> 230 -> crop 224, which alone moves
features past the extraction tolerance); any other size goes through the model's own transform.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms

from ..errors import UserError
from .clip import preprocess_images


def _normalize(preprocess) -> transforms.Normalize:
    steps = getattr(preprocess, "transforms", [])
    found = [t for t in steps if isinstance(t, transforms.Normalize)]
    if not found:
        raise UserError("the model's image transform has no Normalize step")
    return found[-1]


def input_size(loaded) -> int:
    """The square input size (px) of an open_clip model (``LoadedModel``)."""
    size = loaded.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def to_pixels(loaded, images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) release images -> (n, 3, S, S) model input.

    Float images in [0, 1] already at the model's input size are only normalised (no resize);
    everything else is converted to uint8 and goes through the model's transform
    (:func:`pipeline.features.clip.preprocess_batch`).
    """
    return transform_pixels(loaded.preprocess, input_size(loaded), images)


def transform_pixels(transform, size: int, images: np.ndarray) -> torch.Tensor:
    """:func:`to_pixels` with the model's transform and input size alone (what a data-loader worker holds)."""
    if images.dtype.kind == "f" and images.shape[1] == images.shape[2] == size:
        norm = _normalize(transform)
        return norm(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)))
    if images.dtype.kind == "f":
        images = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    return preprocess_images(transform, images)
