"""NeuroClips' Perception Reconstructor: fMRI of one TR -> its F blurry frames (pixels or VAE latents).

After the published code (github gongzix/NeuroClips ``src/Perception.py``, ``src/train_PR.py``):

1. *Inception extension*: the TR's voxels -> ``Linear(V, width)``, GELU, dropout, then
   ``Linear(width, F x hidden)``, GELU, dropout -> one ``hidden`` vector per frame (published:
   ``Linear(V, 256)`` then ``Linear(256, F x V)`` back to F voxel vectors, then one ``Linear(V, 4096)``
   shared by all F frames);
2. per frame, ``depth`` residual MLP blocks ``x + MLP(LayerNorm(x))`` of width ``hidden``. These are
   live layers and our addition: the published code has 4 mixer blocks of width 4096 (and one of
   width 256 in the extension), but at its sequence length 1 they do nothing. Their channel-mixing
   half normalises an axis of length 1 (LayerNorm's output is its bias, a constant) and each block
   adds it to the residual of the block *input*, so the token-mixing MLP's output never reaches the
   block's output: the published stack is the identity plus one learned scalar (re-randomising the
   token-mixing weights changes the output by exactly 0);
3. ``Linear(hidden, C0 * g * g)``, dropout 0.3, GroupNorm, then an upsampling decoder of
   ``channels`` (one residual conv, a temporal conv and 2x upsampling per step; published:
   ``DecoderVideo``, diffusers' VAE decoder blocks [128, 64, 32] with temporal attention) to the
   target's spatial size and channels: 4 x 28 x 28 SD-VAE
   latents of 224 px frames in the paper; here any (F, H, W, 3) ``frames`` or (F, C, h, w)
   ``frame_latents`` array of the video cache (g = H / 2^(len(channels) - 1)).

Loss: L1 to the target (published: L1 on the VAE latents ``mode() * 0.18215``), here in
standardised target units (per-element mean/std of the training targets, see :mod:`.base`), so
pixels and latents train alike; ``loss: mse`` on request.

Sizes. The published expansion, ``Linear(256, F x V)`` plus the shared ``Linear(V, 4096)``, has
75,818,282 parameters at subject 1's 13,447 voxels and F = 6; here it is ``Linear(width, F x
hidden)``, 1,579,008 parameters with the defaults. The defaults build 19,975,396 parameters at
13,447 voxels for 6 frames of 4 x 28 x 28 latents (:meth:`Perception.parameter_counts` breaks it
down; most of it is the extension's input layer, the mixers and the grid projection); params.yaml
sets the demo's smaller sizes.

Departures, on purpose: the expansion to F voxel vectors and the shared ridge are folded into one
``Linear(width, F x hidden)`` (above); the mixers are live residual blocks (above); the decoder's
temporal layers are 1-D convolutions over the F frames of a clip at each pixel (the published
temporal attention runs over every frame of a *batch*, across clips, because its ``time`` argument
is the batch's frame count); no ConvNeXt contrastive term (0.1 x soft-CLIP on ConvNeXt-XL features
of the frames: its weights are not part of this project); the published checkpoint is selected on
test-set PixCorr, here on the validation split of the training rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from .base import Adapter, check_positive, roi_indices

LOSSES = ("l1", "mse")
PIXEL_TARGET = "frames"
"""The video cache's (N, F, H, W, 3) uint8 frames: channels last; every other target is (F, C, h, w)."""


@dataclass
class PerceptionConfig:
    """Sizes and loss of :class:`Perception` (see the module docstring)."""

    target: str = PIXEL_TARGET
    rois: tuple[str, ...] | None = None  # input voxels; None: all of the cache's voxels
    width: int = 256  # the Inception extension's width (published 256)
    hidden: int = 1024  # per-frame width of the mixer (published 4096)
    depth: int = 4  # live residual MLP blocks (published: 4 mixer blocks, inert at sequence length 1)
    channels: tuple[int, ...] = (128, 64, 32)  # decoder widths, first at the coarsest grid (published)
    dropout: float = 0.15
    head_dropout: float = 0.3
    loss: str = "l1"

    def __post_init__(self) -> None:
        self.rois = tuple(self.rois) if self.rois else None
        self.channels = tuple(self.channels)
        check_positive(self, "width", "hidden")
        if not isinstance(self.depth, int) or self.depth < 0:
            raise UserError(f"perception depth must be an integer >= 0, not {self.depth!r}")
        if not self.channels or any(not isinstance(c, int) or c < 1 or c % 4 for c in self.channels):
            raise UserError(f"perception channels must be multiples of 4, not {self.channels}")
        for name in ("dropout", "head_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"perception {name} must be in [0, 1), not {getattr(self, name)!r}")
        if self.loss not in LOSSES:
            raise UserError(f"perception loss must be one of {LOSSES}, not {self.loss!r}")


class _Mixer(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _UpBlock(nn.Module):
    """Residual 3x3 conv block, a temporal conv over the clip's frames at each pixel, 2x nearest upsampling."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm, self.conv = nn.GroupNorm(4, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.temporal = nn.Conv3d(c_out, c_out, (3, 1, 1), padding=(1, 0, 0))
        nn.init.zeros_(self.temporal.weight)  # starts as identity: frames decoded independently
        nn.init.zeros_(self.temporal.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.skip(x) + self.conv(F.silu(self.norm(x)))
        bf, c, hh, ww = h.shape
        clip = h.view(bf // frames, frames, c, hh, ww).transpose(1, 2)  # (B, C, F, H, W)
        h = (clip + self.temporal(clip)).transpose(1, 2).reshape(bf, c, hh, ww)
        return F.interpolate(h, scale_factor=2.0, mode="nearest")


class Perception(Adapter):
    method = "perception"
    config_class = PerceptionConfig

    def __init__(self, config: PerceptionConfig, n_voxels: int, targets: Mapping[str, Any],
                 voxel_groups: Mapping[str, np.ndarray | int]):
        super().__init__(config, n_voxels, targets, voxel_groups)
        c = config
        shape = self.target_shapes[c.target]
        if len(shape) != 4:
            raise UserError(f"perception target {c.target} has rows of shape {shape}; expected (frames, H, W, 3) "
                            "pixels or (frames, C, h, w) latents")
        self.channels_last = c.target == PIXEL_TARGET
        self.frames = shape[0]
        self.out_channels, side, other = (shape[3], shape[1], shape[2]) if self.channels_last else shape[1:]
        scale = 2 ** (len(c.channels) - 1)
        if side != other or side % scale:
            raise UserError(f"perception: the target's {side}x{other} frames must be square and divisible by "
                            f"{scale} (2 ^ (len(channels) - 1))")
        self.grid = side // scale
        self.inception = nn.Sequential(nn.Linear(self.group_sizes["input"], c.width), nn.GELU(), nn.Dropout(c.dropout))
        self.expand = nn.Sequential(nn.Linear(c.width, self.frames * c.hidden), nn.GELU(), nn.Dropout(c.dropout))
        self.mixers = nn.Sequential(*(_Mixer(c.hidden, c.dropout) for _ in range(c.depth)))
        self.to_grid = nn.Sequential(nn.Linear(c.hidden, c.channels[0] * self.grid**2), nn.Dropout(c.head_dropout))
        self.grid_norm = nn.GroupNorm(1, c.channels[0])
        self.decoder = nn.ModuleList(_UpBlock(a, b) for a, b in zip(c.channels[:-1], c.channels[1:]))
        self.out_norm = nn.GroupNorm(4, c.channels[-1])
        self.out = nn.Conv2d(c.channels[-1], self.out_channels, 3, padding=1)

    @classmethod
    def targets_for(cls, config: PerceptionConfig) -> list[str]:
        return [config.target]

    @classmethod
    def with_targets(cls, params: Mapping[str, Any], targets: Sequence[str]) -> dict[str, Any]:
        if len(targets) != 1:
            raise UserError("--targets for perception: one video-cache array (frames or frame_latents)")
        return {**params, "target": targets[0]}

    @classmethod
    def voxel_groups_for(cls, config: PerceptionConfig, voxels: Mapping[str, Any] | None,
                         n_voxels: int) -> dict[str, np.ndarray]:
        return {"input": roi_indices(voxels, config.rois, n_voxels)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c, b = self.config, len(x)
        h = self.expand(self.inception(self.voxels(x, "input"))).view(b * self.frames, c.hidden)
        h = self.to_grid(self.mixers(h)).view(b * self.frames, c.channels[0], self.grid, self.grid)
        h = self.grid_norm(h)
        for block in self.decoder:
            h = block(h, self.frames)
        h = self.out(F.silu(self.out_norm(h)))
        h = h.view(b, self.frames, *h.shape[1:])
        return {c.target: h.permute(0, 1, 3, 4, 2) if self.channels_last else h}

    def loss(self, x: torch.Tensor, targets: Mapping[str, torch.Tensor],
             groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        name = self.config.target
        pred = self(x)[name].float()
        z, _ = self.standardized_target(name, targets[name])
        term = F.l1_loss(pred, z) if self.config.loss == "l1" else F.mse_loss(pred, z)
        return {f"{self.config.loss}:{name}": term, "loss": term}
