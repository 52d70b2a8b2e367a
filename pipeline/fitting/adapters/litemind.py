"""Lite-Mind's DFT backbone (arXiv 2312.03781) as an alternative encoder for the CLIP-cache targets.

The input voxels (every ``nsdgeneral`` voxel by default) are zero-padded to a multiple of
``patch_size`` and cut into patches by a Conv1d (kernel = stride = patch size), plus a learned
position embedding. Stages of Fourier blocks follow, with a linear change of width between stages.
A block applies, on the rFFT over the *patch* axis, a learned complex filter (GFNet-style global
filter) then, after a channel MLP, a complex-valued linear layer with ReLU and soft-shrinkage in
the frequency domain, each part back through the inverse rFFT; the block is residual. One head per
target: tokens (T, C) as in the paper (channels -> T tokens, then patches -> C); a vector (D,) is
one token (the paper's class-token variant averages patches instead, which on the demo loses the
ROI-specific patches). Loss: InfoNCE per target (brain -> CLIP only, as in the paper) and an
optional MSE.

Departures from the public code, on purpose: the filter is the plain GFNet product (the code also
multiplies by the complex square of the spectrum), and the frequency MLP is a full complex linear
layer (the code's ``einsum('bijd,dd->bijd')`` only uses the diagonal of its weight matrices).
The paper's sizes are ``patch_size=450, dims=(512, 256, 128, 257), depths=(2, 10, 2, 4),
mlp_ratio=4`` (the paper reports 13-16M parameters; this module with those sizes, a 257x768 target
and 15,724 voxels has 15.5M) and a logit scale of e^8; the defaults here
are tiny, for the demo, and the temperature is 0.05 (a logit scale of 20), which trains stably on
small data; set ``temperature=0.000335`` for the paper's value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from .base import Adapter, check_positive, check_weights, prediction_shape, roi_indices
from .losses import info_nce, mse


@dataclass
class LiteMindConfig:
    """Sizes and loss settings of :class:`LiteMind` (paper values in the module doc)."""

    targets: tuple[str, ...] = ("layers/11-20_mean", "image_embeds")
    rois: tuple[str, ...] | None = None  # input voxels; None: every nsdgeneral voxel, as in the paper
    patch_size: int = 32
    dims: tuple[int, ...] = (64, 32)
    depths: tuple[int, ...] = (1, 1)
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    sparsity: float = 0.01  # soft-shrink threshold in the frequency MLP
    temperature: float = 0.05
    symmetric: bool = False
    w_nce: float = 1.0
    w_mse: float = 0.5

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.rois = tuple(self.rois) if self.rois else None
        self.dims, self.depths = tuple(self.dims), tuple(self.depths)
        if not self.targets:
            raise UserError("litemind targets: name at least one CLIP-cache array")
        if not self.dims or len(self.dims) != len(self.depths):
            raise UserError(f"litemind dims {self.dims} and depths {self.depths} must be non-empty and of equal length")
        if any(not isinstance(v, int) or v < 1 for v in self.dims + self.depths):
            raise UserError(f"litemind dims and depths must be integers >= 1, not {self.dims} / {self.depths}")
        check_positive(self, "patch_size", "mlp_ratio", "temperature")
        if not 0 <= self.dropout < 1:
            raise UserError(f"litemind dropout must be in [0, 1), not {self.dropout!r}")
        check_weights(self)
        if not (self.w_nce or self.w_mse):
            raise UserError("litemind: w_nce or w_mse must be > 0")


class FrequencyBlock(nn.Module):
    """x + FreqMLP(norm(MLP(norm(Filter(norm(x)))))), the FFTs over the patch axis in float32."""

    def __init__(self, n_patches: int, dim: int, mlp_ratio: float, dropout: float, sparsity: float):
        super().__init__()
        n_freq = n_patches // 2 + 1
        self.n_patches, self.sparsity = n_patches, sparsity
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.filter = nn.Parameter(torch.randn(n_freq, dim, 2) * 0.02)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.w_real = nn.Parameter(torch.randn(dim, dim) * 0.02)
        self.w_imag = nn.Parameter(torch.randn(dim, dim) * 0.02)
        self.b_real = nn.Parameter(torch.zeros(dim))
        self.b_imag = nn.Parameter(torch.zeros(dim))

    def global_filter(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.rfft(x.float(), dim=1, norm="ortho")
        return torch.fft.irfft(spec * torch.view_as_complex(self.filter), n=self.n_patches, dim=1, norm="ortho")

    def frequency_mlp(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.rfft(x.float(), dim=1, norm="ortho")
        re = F.relu(spec.real @ self.w_real - spec.imag @ self.w_imag + self.b_real)
        im = F.relu(spec.imag @ self.w_real + spec.real @ self.w_imag + self.b_imag)
        out = torch.complex(F.softshrink(re, self.sparsity), F.softshrink(im, self.sparsity))
        return torch.fft.irfft(out, n=self.n_patches, dim=1, norm="ortho")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # cuFFT in half precision wants 2^k sizes
            y = self.global_filter(self.norm1(x.float()))
            y = self.mlp(self.norm2(y))
            return x.float() + self.frequency_mlp(self.norm3(y))


class LiteMind(Adapter):
    method = "litemind"
    config_class = LiteMindConfig

    def __init__(
        self,
        config: LiteMindConfig,
        n_voxels: int,
        targets: Mapping[str, Any],
        voxel_groups: Mapping[str, np.ndarray | int],
    ):
        super().__init__(config, n_voxels, targets, voxel_groups)
        c = config
        self.n_patches = math.ceil(self.group_sizes["input"] / c.patch_size)
        self.patch = nn.Conv1d(1, c.dims[0], kernel_size=c.patch_size, stride=c.patch_size)
        self.pos = nn.Parameter(torch.randn(1, self.n_patches, c.dims[0]) * 0.02)
        self.drop = nn.Dropout(c.dropout)
        self.stages = nn.ModuleList(
            nn.Sequential(*(FrequencyBlock(self.n_patches, d, c.mlp_ratio, c.dropout, c.sparsity) for _ in range(n)))
            for d, n in zip(c.dims, c.depths, strict=True)
        )
        self.transitions = nn.ModuleList(nn.Linear(a, b) for a, b in zip(c.dims[:-1], c.dims[1:], strict=True))
        self.norm = nn.LayerNorm(c.dims[-1])
        self.heads = nn.ModuleDict()
        for i, name in enumerate(c.targets):
            shape = prediction_shape(name, self.target_shapes[name])
            if len(shape) not in (1, 2):
                raise UserError(f"litemind target {name} has rows of shape {shape}; expected (T, C) or (D,)")
            tokens, channels = shape if len(shape) == 2 else (1, shape[0])
            # channels -> T tokens, then patches -> C channels; a (D,) vector is one token
            head = [nn.Linear(c.dims[-1], tokens), _Transpose(), nn.Linear(self.n_patches, channels)]
            self.heads[str(i)] = nn.Sequential(*head, *([nn.Flatten(1)] if len(shape) == 1 else []))

    @classmethod
    def targets_for(cls, config: LiteMindConfig) -> list[str]:
        return list(config.targets)

    @classmethod
    def voxel_groups_for(
        cls, config: LiteMindConfig, voxels: Mapping[str, Any] | None, n_voxels: int
    ) -> dict[str, np.ndarray]:
        return {"input": roi_indices(voxels, config.rois, n_voxels)}

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V) betas -> (B, patches, dims[-1]) features."""
        v = self.voxels(x, "input")
        v = F.pad(v, (0, self.n_patches * self.config.patch_size - v.shape[1]))
        h = self.drop(self.patch(v[:, None]).transpose(1, 2) + self.pos)
        for i, stage in enumerate(self.stages):
            if i:
                h = self.transitions[i - 1](h)
            h = stage(h)
        return self.norm(h)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {name: self.heads[str(i)](h) for i, name in enumerate(self.config.targets)}

    def loss(
        self, x: torch.Tensor, targets: Mapping[str, torch.Tensor], groups: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        for name, pred in self(x).items():
            z, has = self.standardized_target(name, targets[name])
            g = groups
            if has is not None:
                pred, z, g = pred[has], z[has], None if groups is None else groups[has]
            if c.w_nce and len(z) >= 2:
                terms[f"nce:{name}"] = c.w_nce * info_nce(pred, z, c.temperature, c.symmetric, g)
            if c.w_mse and len(z):
                terms[f"mse:{name}"] = c.w_mse * mse(pred, z)
        terms["loss"] = sum(terms.values())
        return terms


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)
