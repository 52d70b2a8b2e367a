"""BrainMCLIP (arXiv 2510.19332): two ROI-split encoders aligned to a detail and a semantic CLIP target.

Inputs follow the functional hierarchy: fMRI-Semantic ``F_S`` = high-level voxels (union of the
``floc-*`` labels > 0), fMRI-Detail ``F_D`` = every ``nsdgeneral`` voxel (or, with
``detail_rois=("prf-visualrois",)``, the low-level areas only; the paper's summaries disagree, so it
is a switch). Each input goes through a residual-MLP encoder to a brain embedding (``b_D``, ``b_S``,
``width`` wide). Heads map ``b_D`` to the detail target's tokens (T, C) (default ``layers/11-20_mean``,
the mean of blocks 11..20 of ViT-L/14) and ``b_S`` to the semantic target (default ``image_embeds``,
what unCLIP consumes; or block 24's tokens, ``layers/24`` or ``layers/24_proj``, as the paper aligns
fMRI-Semantic to layer 24: then the semantic head is a token head too). With ``text_target="text_embeds"`` a third head maps ``b_S`` to the CLIP text
space of the image's captions (BrainCLIP-style text supervision).

Decoders ``D_D``, ``D_S`` map brain embeddings back to their fMRI input. Besides self-reconstruction
(``D_D(b_D) ~ F_D``, ``D_S(b_S) ~ F_S``) the cross terms ``D_D(b_S) ~ F_D`` and ``D_S(b_D) ~ F_S``
tie the two embeddings together (the paper's robustness to noisy intermediate features). The paper
does not say what space the decoders read; here it is the shared ``width``-d brain-embedding space,
which is what makes the cross terms well-defined. Decoders are used in training only.

The multi-granularity loss, in standardised target units (see :mod:`.base`):
  global   ``w_semantic`` InfoNCE(semantic, tokens pooled by ``semantic_pool``) + ``w_detail``
           InfoNCE(detail tokens pooled by ``detail_pool``: ``flatten`` (default), ``mean`` or ``cls``)
  fine     ``w_tokens`` (1 - cosine) between matching detail tokens, averaged with the same term on
           the semantic tokens when the semantic target is a token array (both branches)
  scale    ``w_mse`` MSE of both predictions (keeps magnitudes usable by unCLIP; InfoNCE ignores norms)
  text     ``w_text`` InfoNCE(text head, mean caption embedding), images without captions skipped
  fMRI     ``w_self`` self- and ``w_cross`` cross-reconstruction MSE.

Defaults and why (the paper publishes none of them): InfoNCE at temperature 0.05 with both
directions as in CLIP; the detail tokens flattened for the global term, the geometry of the
retrieval metric and of MindEye2's contrastive loss; equal weights for the three alignment terms
so neither granularity dominates; MSE at 0.5 as a scale anchor; reconstruction at 0.1 / 0.05,
small regularisers that should not pull the embeddings away from CLIP space; ``width=1024,
depth=2``, like MindEye's residual MLP but far shallower; a low-rank token head
(``width -> T x token_rank -> C``) so that the 257x1024 ViT-L/14 token target costs ~17M
parameters instead of the ~270M of a dense head. With ViT-L/14 targets (257x1024 detail tokens,
768-d embeds), subj01's 15,724 nsdgeneral voxels and ~5,000 floc voxels, the defaults give 64.4M
parameters, 43.1M of them used at inference (the decoders are training-only);
:meth:`BrainMCLIP.parameter_counts` breaks them down. The demo uses tiny widths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import UserError
from .base import CAPTIONS, FLOC, Adapter, check_positive, check_weights, prediction_shape
from .losses import info_nce, mse, token_cosine

POOLS = ("mean", "cls", "flatten")


@dataclass
class MCLIPConfig:
    """Every width, loss weight and ROI assignment of :class:`BrainMCLIP` (defaults: module doc)."""

    detail_target: str = "layers/11-20_mean"
    semantic_target: str = "image_embeds"
    text_target: str | None = None  # "text_embeds" switches on the caption branch
    detail_rois: tuple[str, ...] | None = None  # None: every nsdgeneral voxel
    semantic_rois: tuple[str, ...] = FLOC
    width: int = 1024
    depth: int = 2
    token_rank: int = 64
    dropout: float = 0.15
    temperature: float = 0.05
    detail_pool: str = "flatten"  # how tokens are pooled for the global detail term: mean, cls, flatten
    semantic_pool: str = "flatten"  # the same for a token semantic target
    w_semantic: float = 1.0
    w_detail: float = 1.0
    w_tokens: float = 1.0
    w_mse: float = 0.5
    w_text: float = 0.5
    w_self: float = 0.1
    w_cross: float = 0.05

    def __post_init__(self) -> None:
        self.detail_rois = tuple(self.detail_rois) if self.detail_rois else None
        self.semantic_rois = tuple(self.semantic_rois)
        check_positive(self, "width", "token_rank", "temperature")
        check_weights(self)
        if not isinstance(self.depth, int) or self.depth < 0:
            raise UserError(f"mclip depth must be an integer >= 0, not {self.depth!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"mclip dropout must be in [0, 1), not {self.dropout!r}")
        for name in ("detail_pool", "semantic_pool"):
            if getattr(self, name) not in POOLS:
                raise UserError(f"mclip {name} must be one of {POOLS}, not {getattr(self, name)!r}")
        if not (self.w_semantic or self.w_detail or self.w_tokens or self.w_mse):
            raise UserError("mclip: at least one of w_semantic, w_detail, w_tokens, w_mse must be > 0")
        if self.text_target not in (None, CAPTIONS):
            raise UserError(f"mclip text_target must be {CAPTIONS!r} or null, not {self.text_target!r}")


class ResidualMLP(nn.Module):
    """Voxels -> ``width``: an input projection, then ``depth`` residual (Linear, LayerNorm, GELU) blocks."""

    def __init__(self, n_in: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(n_in, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout))
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return h


class TokenHead(nn.Module):
    """``width`` -> (T, C) tokens through a rank-r bottleneck per token (T*r + r*C weights per unit)."""

    def __init__(self, width: int, n_tokens: int, channels: int, rank: int):
        super().__init__()
        self.shape = (n_tokens, rank)
        self.coef = nn.Linear(width, n_tokens * rank)
        self.norm = nn.LayerNorm(rank)
        self.basis = nn.Linear(rank, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.basis(self.norm(self.coef(h).view(len(h), *self.shape)))


def pool_tokens(tokens: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return tokens.mean(1)
    if how == "cls":
        return tokens[:, 0]
    return tokens.flatten(1)


class BrainMCLIP(Adapter):
    method = "mclip"
    config_class = MCLIPConfig

    def __init__(
        self,
        config: MCLIPConfig,
        n_voxels: int,
        targets: Mapping[str, Any],
        voxel_groups: Mapping[str, np.ndarray | int],
    ):
        super().__init__(config, n_voxels, targets, voxel_groups)
        c = config
        detail = prediction_shape(c.detail_target, self.target_shapes[c.detail_target])
        semantic = prediction_shape(c.semantic_target, self.target_shapes[c.semantic_target])
        if len(detail) != 2:
            raise UserError(
                f"mclip detail_target {c.detail_target} must hold (N, T, C) tokens, not rows of shape {detail}"
            )
        if len(semantic) not in (1, 2):
            raise UserError(
                f"mclip semantic_target {c.semantic_target} must hold (N, D) vectors or (N, T, C) tokens, "
                f"not rows of shape {semantic}"
            )
        self.semantic_tokens = len(semantic) == 2
        n_d, n_s = self.group_sizes["detail"], self.group_sizes["semantic"]
        self.enc_detail = ResidualMLP(n_d, c.width, c.depth, c.dropout)
        self.enc_semantic = ResidualMLP(n_s, c.width, c.depth, c.dropout)
        self.head_detail = TokenHead(c.width, *detail, c.token_rank)
        self.head_semantic = (
            TokenHead(c.width, *semantic, c.token_rank) if self.semantic_tokens else nn.Linear(c.width, semantic[0])
        )
        if c.text_target:
            self.head_text = nn.Linear(c.width, prediction_shape(CAPTIONS, self.target_shapes[CAPTIONS])[0])
        if c.w_self or c.w_cross:
            self.dec_detail = nn.Linear(c.width, n_d)
            self.dec_semantic = nn.Linear(c.width, n_s)

    @classmethod
    def targets_for(cls, config: MCLIPConfig) -> list[str]:
        return [config.detail_target, config.semantic_target] + ([config.text_target] if config.text_target else [])

    @classmethod
    def with_targets(cls, params: Mapping[str, Any], targets: Sequence[str]) -> dict[str, Any]:
        if len(targets) not in (2, 3):
            raise UserError("--targets for mclip: detail,semantic[,text] (e.g. layers/11-20_mean,image_embeds)")
        return {**params, **dict(zip(("detail_target", "semantic_target", "text_target"), targets))}

    @classmethod
    def group_rois(cls, config: MCLIPConfig) -> dict[str, tuple[str, ...] | None]:
        return {"detail": config.detail_rois, "semantic": config.semantic_rois}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) betas -> brain embeddings ``b_D``, ``b_S`` (B, width)."""
        return self.enc_detail(self.voxels(x, "detail")), self.enc_semantic(self.voxels(x, "semantic"))

    def heads(self, b_d: torch.Tensor, b_s: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        out = {c.detail_target: self.head_detail(b_d), c.semantic_target: self.head_semantic(b_s)}
        if c.text_target:
            out[c.text_target] = self.head_text(b_s)
        return out

    def predict_heads(self, features: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.heads(*features)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(*self.embed(x))

    def skip_blocks(self) -> list[str]:
        """The blocks a Skip-LoRA path bridges (see :mod:`.finetune`): each encoder's input
        projection and residual blocks."""
        return [f"{enc}.{part}" for enc in ("enc_detail", "enc_semantic")
                for part in ["inp", *(f"blocks.{i}" for i in range(self.config.depth))]]

    def loss(
        self, x: torch.Tensor, targets: Mapping[str, torch.Tensor], groups: torch.Tensor | None = None,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``features``: brain embeddings already computed from ``x`` (and refined, e.g. by brain experts)."""
        c = self.config
        b_d, b_s = self.embed(x) if features is None else features
        pred = self.heads(b_d, b_s)
        z_d, _ = self.standardized_target(c.detail_target, targets[c.detail_target])
        z_s, _ = self.standardized_target(c.semantic_target, targets[c.semantic_target])
        p_d, p_s = pred[c.detail_target], pred[c.semantic_target]
        terms: dict[str, torch.Tensor] = {}

        def add(name: str, weight: float, value: Any) -> None:
            if weight:
                terms[name] = weight * value()

        add("semantic", c.w_semantic, lambda: info_nce(
            pool_tokens(p_s, c.semantic_pool) if self.semantic_tokens else p_s,
            pool_tokens(z_s, c.semantic_pool) if self.semantic_tokens else z_s, c.temperature, groups=groups))
        add(
            "detail",
            c.w_detail,
            lambda: info_nce(
                pool_tokens(p_d, c.detail_pool), pool_tokens(z_d, c.detail_pool), c.temperature, groups=groups
            ),
        )
        add("tokens", c.w_tokens, lambda: (token_cosine(p_d, z_d) + token_cosine(p_s, z_s)) / 2
            if self.semantic_tokens else token_cosine(p_d, z_d))
        add("mse", c.w_mse, lambda: (mse(p_d, z_d) + mse(p_s, z_s)) / 2)
        if c.text_target and c.w_text:
            z_t, has = self.standardized_target(c.text_target, targets[c.text_target])
            terms["text"] = c.w_text * info_nce(pred[c.text_target], z_t, c.temperature, groups=groups, mask=has)
        if c.w_self or c.w_cross:  # targets detached: in front of a subject layer x is itself learned
            x_d, x_s = self.voxels(x.detach(), "detail"), self.voxels(x.detach(), "semantic")
            add("self_rec", c.w_self, lambda: (mse(self.dec_detail(b_d), x_d) + mse(self.dec_semantic(b_s), x_s)) / 2)
            add("cross_rec", c.w_cross, lambda: (mse(self.dec_detail(b_s), x_d) + mse(self.dec_semantic(b_d), x_s)) / 2)
        terms["loss"] = sum(terms.values())
        return terms
