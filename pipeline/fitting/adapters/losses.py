"""Alignment losses shared by the trained adapters (the retrieval metric lives in :mod:`pipeline.evaluation.metrics`).

Every function takes batched torch tensors ``(B, ...)`` and flattens what it needs; none keeps state.
Losses are computed in float32 whatever the autocast dtype of the forward pass: each runs with
autocast disabled (:func:`_float32`), since ``.float()`` alone does not leave autocast and its matmul
would cast the operands back to bf16 (at Lite-Mind's logit scale e^8 that ties the logits of
near-duplicate targets; issue 21 measured a gradient cosine of 0.71-0.87 to float32). Under torchrun the
contrastive loss sees the rows of every process (:func:`pipeline.fitting.distributed.gather`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..distributed import gather


def _float32(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss(pred, ...)`` with autocast off on ``pred``'s device, so its float32 operands stay float32."""

    @functools.wraps(loss)
    def wrapped(pred: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(pred.device.type, enabled=False):
            return loss(pred, *args, **kwargs)

    return wrapped


@_float32
def info_nce(
    pred: torch.Tensor,
    true: torch.Tensor,
    temperature: float,
    symmetric: bool = True,
    groups: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP-style contrastive loss between L2-normalised, flattened predictions and targets.

    Row i of ``pred`` should pick row i of ``true`` among the batch. ``groups`` (B,) marks rows
    that show the same image (trial-level data): they are all positives of each other, with equal
    probability, instead of being pushed apart. ``symmetric`` adds the target->brain direction
    (CLIP); Lite-Mind uses brain->target only. ``mask`` (B,) bool keeps only those rows (e.g. images
    with captions); with fewer than 2 rows left the loss is 0.
    """
    pred, true, groups, mask = gather(pred), gather(true), gather(groups), gather(mask)
    if mask is not None:
        pred, true = pred[mask], true[mask]
        groups = None if groups is None else groups[mask]
    if len(pred) < 2:
        return pred.sum() * 0.0
    p = F.normalize(pred.float().flatten(1), dim=1)
    t = F.normalize(true.float().flatten(1), dim=1)
    logits = p @ t.T / temperature
    if groups is None:
        labels = torch.eye(len(p), device=p.device)
    else:
        labels = (groups[:, None] == groups[None, :]).float()
    labels = labels / labels.sum(1, keepdim=True)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss


@_float32
def token_cosine(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Fine-grained term: 1 - cosine between matching tokens (last axis), averaged over tokens."""
    return 1 - F.cosine_similarity(pred.float(), true.float(), dim=-1).mean()


@_float32
def mse(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), true.float())


def caption_mean(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, D) caption embeddings, zero rows = missing -> (B, D) mean of the present captions
    and the (B,) mask of rows that have at least one caption."""
    present = text.abs().sum(-1) > 0
    count = present.sum(1)
    mean = (text * present[..., None]).sum(1) / count.clamp_min(1)[:, None]
    return mean, count > 0
