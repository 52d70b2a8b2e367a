"""Lite-Mind's DFT backbone (Gong et al., arXiv 2312.03781, ACM MM 2024) after its public code
(github gongzix/Lite-Mind, ``src/dft_backbone.py``, ``src/engine.py``, ``src/train_litemind.py``),
with the departures listed at the end.

Backbone. The input voxels (every ``nsdgeneral`` voxel by default) are cut into ``patch_size``-voxel
patches by a Conv1d (kernel = stride = patch size, no padding: ``floor(V / patch_size)`` patches, the
trailing ``V mod patch_size`` voxels unused, as published; ``remainder="pad"`` zero-pads instead),
plus a learned position embedding and dropout. Stages of blocks follow (widths ``dims``, depths
``depths``), a Linear between stages changes the width; a final LayerNorm (eps 1e-6 throughout).
One block, with FFTs over the *patch* axis (length N, ``norm="ortho"``)::

    y = DropPath(MLP(LN2(SpectrumCompression(LN1(x)))))
    y = DropPath(FrequencyProjector(LN3(y)))
    x + y

- SpectrumCompression (``filter="spectrum"``, published ``GlobalFilter``): with X = rfft(x),
  ``irfft( sum_m cos((2m + 1) pi / (2M)) * W_m * X * X**2 )`` over M = ``num_filters`` learned
  complex filters W_m (N//2+1, C): cosine-weighted cubic terms of the spectrum. ``filter="linear"``
  is the GFNet global filter ``irfft(W * X)`` (one filter), this module's earlier form, kept as an
  option because it trains more gently on small data.
- FrequencyProjector (published ``FreMLP``): on X = rfft(y), ``ReLU`` of a complex per-channel
  product ``(Xr w_r - Xi w_i + b_r) + i (Xi w_r + Xr w_i + b_i)``, soft-shrink(0.01) of both
  parts, irfft.
- MLP: Linear(C, mlp_ratio C), GELU, Dropout, Linear, Dropout. DropPath rates rise linearly from 0
  to ``drop_path`` over all blocks (timm's stochastic depth); each block draws its two masks
  independently, as the published block calls its DropPath twice.

Heads, one per target: a token target (T, C) is the published one, ``x.transpose -> Linear(N, C)``,
which needs the last stage width ``dims[-1] == T`` (257 for ViT-L/14 all tokens); for another T a
Linear(dims[-1], T) comes first (our addition). A vector target (D,) uses the published class-token
variant (``cls_only``): mean over patches, then Linear(dims[-1], D).

Output. Unlike the published module, whose head output is the prediction, every head here
predicts the *standardised* target: the prediction is ``head * std + mean`` with the per-element
mean and std of the training targets (buffers of :class:`.base.Standardizer`, applied by
:meth:`.base.Adapter.predict_batch`), and the InfoNCE term below sees that mapped value. With the
published weights copied in, the predictions therefore differ from the published module's output
(unless every target element has mean 0 and std 1) and equal it only after the same affine map.

Loss (``engine.py``): one-directional InfoNCE with a fixed logit scale e^8 (``temperature = e^-8``)
on the flattened, L2-normalised raw CLIP targets and predictions (``head * std + mean``, above), in
the published direction: the code calls ``ContrastiveLoss(targets, outputs)``, so the softmax runs
over predictions for each CLIP target row (``direction="target_to_brain"``; ``brain_to_target`` or
``symmetric`` on request). An MSE in standardised units (``w_mse``, default 0 = published) can
anchor the scale.

Defaults are the paper's NSD configuration (``train_litemind.py``): ``patch_size=450,
dims=(512, 256, 128, 257), depths=(2, 10, 2, 4), mlp_ratio=4, dropout=0.1, drop_path=0.15,
num_filters=2`` and the ``layers/24_proj`` target (ViT-L/14 last block -> ln_post -> proj, 257x768).
With subj01's 15,724 voxels (34 patches) this module has 12,709,503 parameters: 98.7% fewer than
MindEye's 996M, the paper's own figure. The published module allocates 15,657,859, of which
2,948,356 are never used (its FreMLP stores full C x C weight matrices but reads only their diagonal
through ``einsum('bijd,dd->bijd')``, and an unused ``embeddings`` vector per block); the function
is the same. :meth:`LiteMind.parameter_counts` breaks the count down.

Departures, on purpose: the per-channel frequency weights are stored as vectors (above); ``irfft``
is given ``n=N`` (the published call omits it, which breaks for an odd number of patches); the
heads' output is mapped back through the training targets' mean and std (Output, above), so the
initial prediction is the mean target instead of about 0 and the learned function differs from the
published one; several targets share one backbone (the published model has one head). The demo's
small widths live in params.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from .base import Adapter, check_positive, check_weights, prediction_shape
from .losses import info_nce, mse

FILTERS = ("spectrum", "linear")
DIRECTIONS = ("target_to_brain", "brain_to_target", "symmetric")
REMAINDERS = ("drop", "pad")


@dataclass
class LiteMindConfig:
    """Sizes and loss settings of :class:`LiteMind` (defaults: the paper's, see the module doc)."""

    targets: tuple[str, ...] = ("layers/24_proj",)
    rois: tuple[str, ...] | None = None  # input voxels; None: every nsdgeneral voxel, as in the paper
    patch_size: int = 450
    remainder: str = "drop"  # voxels after the last whole patch: drop (published) or pad
    dims: tuple[int, ...] = (512, 256, 128, 257)
    depths: tuple[int, ...] = (2, 10, 2, 4)
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    drop_path: float = 0.15
    filter: str = "spectrum"  # spectrum (published) | linear (GFNet product)
    num_filters: int = 2
    sparsity: float = 0.01  # soft-shrink threshold in the frequency projector
    temperature: float = math.exp(-8)  # logit scale e^8, fixed
    direction: str = "target_to_brain"
    w_nce: float = 1.0
    w_mse: float = 0.0

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.rois = tuple(self.rois) if self.rois else None
        self.dims, self.depths = tuple(self.dims), tuple(self.depths)
        if not self.targets:
            raise UserError("litemind targets: name at least one CLIP-cache array")
        if not self.dims or len(self.dims) != len(self.depths):
            raise UserError(f"litemind dims {self.dims} and depths {self.depths} must be non-empty and of equal length")
        if any(not isinstance(v, int) or v < 1 for v in self.dims + self.depths + (self.num_filters,)):
            raise UserError(f"litemind dims, depths and num_filters must be integers >= 1, not "
                            f"{self.dims} / {self.depths} / {self.num_filters}")
        check_positive(self, "patch_size", "mlp_ratio", "temperature")
        for name, value in (("dropout", self.dropout), ("drop_path", self.drop_path)):
            if not 0 <= value < 1:
                raise UserError(f"litemind {name} must be in [0, 1), not {value!r}")
        for name, value, allowed in (("filter", self.filter, FILTERS), ("direction", self.direction, DIRECTIONS),
                                     ("remainder", self.remainder, REMAINDERS)):
            if value not in allowed:
                raise UserError(f"litemind {name} must be one of {allowed}, not {value!r}")
        check_weights(self)
        if not (self.w_nce or self.w_mse):
            raise UserError("litemind: w_nce or w_mse must be > 0")


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's branch with probability p, scale the kept by 1/(1-p)."""
    if p == 0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class SpectrumCompression(nn.Module):
    """``irfft(sum_m cos((2m+1)pi/2M) W_m X^3)`` over the patch axis (``linear``: ``irfft(W X)``)."""

    def __init__(self, n_patches: int, dim: int, num_filters: int, kind: str):
        super().__init__()
        self.n_patches, self.kind = n_patches, kind
        m = num_filters if kind == "spectrum" else 1
        self.weight = nn.Parameter(torch.randn(m, n_patches // 2 + 1, dim, 2) * 0.02)
        cosines = [math.cos((2 * i + 1) * math.pi / (2 * m)) for i in range(m)]
        self.register_buffer("cosines", torch.tensor(cosines), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.rfft(x.float(), dim=1, norm="ortho")
        w = torch.view_as_complex(self.weight)
        if self.kind == "linear":
            out = spec * w[0]
        else:
            out = (self.cosines[:, None, None] * w).sum(0) * spec**3
        return torch.fft.irfft(out, n=self.n_patches, dim=1, norm="ortho")


class FrequencyProjector(nn.Module):
    """Per-channel complex weights on the rFFT over patches, ReLU, soft-shrink, inverse rFFT."""

    def __init__(self, n_patches: int, dim: int, sparsity: float):
        super().__init__()
        self.n_patches, self.sparsity = n_patches, sparsity
        self.w_real, self.w_imag = (nn.Parameter(0.02 * torch.randn(dim)) for _ in range(2))
        self.b_real, self.b_imag = (nn.Parameter(0.02 * torch.randn(dim)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.rfft(x.float(), dim=1, norm="ortho")
        re = F.relu(spec.real * self.w_real - spec.imag * self.w_imag + self.b_real)
        im = F.relu(spec.imag * self.w_real + spec.real * self.w_imag + self.b_imag)
        out = torch.complex(F.softshrink(re, self.sparsity), F.softshrink(im, self.sparsity))
        return torch.fft.irfft(out, n=self.n_patches, dim=1, norm="ortho")


class FrequencyBlock(nn.Module):
    """``x + DropPath(Projector(LN3(DropPath(MLP(LN2(Compression(LN1(x))))))))``, FFTs in float32."""

    def __init__(self, n_patches: int, dim: int, mlp_ratio: float, dropout: float, sparsity: float,
                 drop_path: float = 0.0, num_filters: int = 2, filter: str = "spectrum"):
        super().__init__()
        self.drop_path = drop_path
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.filter = SpectrumCompression(n_patches, dim, num_filters, filter)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.projector = FrequencyProjector(n_patches, dim, sparsity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # cuFFT in half precision wants 2^k sizes
            x = x.float()
            y = drop_path(self.mlp(self.norm2(self.filter(self.norm1(x)))), self.drop_path, self.training)
            y = drop_path(self.projector(self.norm3(y)), self.drop_path, self.training)
            return x + y


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
        v = self.group_sizes["input"]
        self.n_patches = v // c.patch_size if c.remainder == "drop" else math.ceil(v / c.patch_size)
        if self.n_patches < 1:
            raise UserError(f"litemind patch_size {c.patch_size} is larger than the {v} input voxels")
        self.patch = nn.Conv1d(1, c.dims[0], kernel_size=c.patch_size, stride=c.patch_size)
        self.pos = nn.Parameter(torch.zeros(1, self.n_patches, c.dims[0]))
        self.drop = nn.Dropout(c.dropout)
        rates = np.linspace(0, c.drop_path, sum(c.depths)).tolist()
        starts = np.cumsum((0,) + c.depths).tolist()
        self.stages = nn.ModuleList(
            nn.Sequential(*(
                FrequencyBlock(self.n_patches, d, c.mlp_ratio, c.dropout, c.sparsity, rates[s + j], c.num_filters, c.filter)
                for j in range(n)
            ))
            for d, n, s in zip(c.dims, c.depths, starts[:-1], strict=True)
        )
        self.transitions = nn.ModuleList(nn.Linear(a, b) for a, b in zip(c.dims[:-1], c.dims[1:], strict=True))
        self.norm = nn.LayerNorm(c.dims[-1], eps=1e-6)
        self.heads = nn.ModuleDict()
        for i, name in enumerate(c.targets):
            shape = prediction_shape(name, self.target_shapes[name])
            if len(shape) == 1:  # the published class-token head: mean over patches -> D
                self.heads[str(i)] = nn.Sequential(_MeanPatches(), nn.Linear(c.dims[-1], shape[0]))
            elif len(shape) == 2:
                tokens, channels = shape
                to_tokens = [] if tokens == c.dims[-1] else [nn.Linear(c.dims[-1], tokens)]
                self.heads[str(i)] = nn.Sequential(*to_tokens, _Transpose(), nn.Linear(self.n_patches, channels))
            else:
                raise UserError(f"litemind target {name} has rows of shape {shape}; expected (T, C) or (D,)")
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos, std=0.02)

    @classmethod
    def targets_for(cls, config: LiteMindConfig) -> list[str]:
        return list(config.targets)

    @classmethod
    def with_targets(cls, params: Mapping[str, Any], targets: Sequence[str]) -> dict[str, Any]:
        return {**params, "targets": list(targets)}

    @classmethod
    def group_rois(cls, config: LiteMindConfig) -> dict[str, tuple[str, ...] | None]:
        return {"input": config.rois}

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V) betas -> (B, patches, dims[-1]) features."""
        v = self.voxels(x, "input")
        v = F.pad(v, (0, max(0, self.n_patches * self.config.patch_size - v.shape[1])))
        h = self.drop(self.patch(v[:, None]).transpose(1, 2) + self.pos)
        for i, stage in enumerate(self.stages):
            if i:
                h = self.transitions[i - 1](h)
            h = stage(h)
        return self.norm(h)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def predict_heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: self.heads[str(i)](h) for i, name in enumerate(self.config.targets)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.predict_heads(self.backbone(x))

    def skip_blocks(self) -> list[str]:
        """The blocks a Skip-LoRA path bridges (see :mod:`.finetune`): every frequency block."""
        return [f"stages.{i}.{j}" for i, n in enumerate(self.config.depths) for j in range(n)]

    def loss(
        self, x: torch.Tensor, targets: Mapping[str, torch.Tensor], groups: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``features``: the backbone output already computed from ``x`` (and refined, e.g. by brain experts)."""
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        h = self.backbone(x) if features is None else features
        for name, pred in self.predict_heads(h).items():
            z, has = self.standardized_target(name, targets[name])
            if c.w_nce:
                scaler = self.scaler(name)  # the contrastive term compares raw CLIP values, as published
                raw_pred, raw_true = scaler.decode(pred), scaler.decode(z)
                if c.direction == "target_to_brain":
                    nce = info_nce(raw_true, raw_pred, c.temperature, symmetric=False, groups=groups, mask=has)
                else:
                    nce = info_nce(raw_pred, raw_true, c.temperature, c.direction == "symmetric", groups, has)
                terms[f"nce:{name}"] = c.w_nce * nce
            if has is not None:
                pred, z = pred[has], z[has]
            if c.w_mse and len(z):
                terms[f"mse:{name}"] = c.w_mse * mse(pred, z)
        terms["loss"] = sum(terms.values())
        return terms


def _init_weights(module: nn.Module) -> None:
    """The published initialisation: truncated-normal(0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class _MeanPatches(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)
