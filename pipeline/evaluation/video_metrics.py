"""Video reconstruction metrics on plain arrays (MinD-Video / NeuroClips protocol), next to :mod:`.metrics`.

- :func:`psnr_each` — per-frame PSNR in dB, data range 1 (uint8 / 255), ``skimage.metrics.peak_signal_noise_ratio``;
  SSIM is :func:`pipeline.evaluation.metrics.ssim_each` (grayscale, Gaussian window) on every frame.
- :func:`clip_pcc` — temporal consistency: mean cosine similarity of the CLIP image embeddings of
  adjacent frames of each video (NeuroClips' CLIP-pcc), mean over videos.
- :func:`n_way_identification` — feature-based n-way identification, the n-way generalisation of
  :func:`pipeline.evaluation.metrics.two_way_identification`: a reconstruction counts as identified
  when its feature correlation with its own ground truth beats every one of n - 1 distractor ground
  truths drawn at random from the other items (ties fail); ``trials`` draws per item; chance 1/n.
- :func:`n_way_top1_classification` — MinD-Video's classifier-based n-way top-1: the ground truth's
  class is the classifier's argmax on the ground truth; the reconstruction succeeds when, among
  that class and n - 1 random other classes, its own predicted probability is highest for that
  class (ties fail).

Both n-way metrics draw from ``np.random.default_rng(seed)``, item by item, trial by trial, so a
result is reproducible and independent of array layout.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .metrics import cross_correlation, feature_rows, float_pairs


def psnr_each(gt: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """(N,) PSNR of (N, H, W, 3) images (uint8 or [0, 1] float), data range 1; identical images give inf.
    Converted to float a batch at a time (:func:`.metrics.float_pairs`)."""
    mse = np.concatenate([((g - r) ** 2).reshape(len(g), -1).mean(1) for g, r in float_pairs(gt, rec)])
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


def clip_pcc(embeds: np.ndarray) -> float:
    """Mean over videos of the mean cosine similarity of adjacent frames' embeddings (n, F, D), F >= 2."""
    e = np.asarray(embeds, np.float64)
    if e.ndim != 3 or e.shape[1] < 2:
        raise UserError(f"CLIP-pcc needs (videos, frames >= 2, D) embeddings, got {e.shape}")
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return float((e[:, 1:] * e[:, :-1]).sum(-1).mean())


def _check_n(n: int, items: int, what: str) -> None:
    if not 2 <= n <= items:
        raise UserError(f"{n}-way {what} needs 2 <= n <= {items} (the number of candidates)")


def n_way_identification(gt_feats: np.ndarray, rec_feats: np.ndarray, n: int, trials: int = 100,
                         seed: int = 0) -> float:
    """Fraction of (item, trial) pairs whose reconstruction correlates best with its own ground truth
    among it and n - 1 random other ground truths (see the module docstring)."""
    g, r = feature_rows(gt_feats, "gt_feats", np.float64), feature_rows(rec_feats, "rec_feats", np.float64)
    if g.shape != r.shape:
        raise UserError(f"features differ in shape: ground truth {g.shape}, reconstructions {r.shape}")
    m = len(g)
    _check_n(n, m, "identification")
    corr = cross_correlation(g, r)  # corr[i, j] = r(GT_i, rec_j); NaN for constant rows (never a hit)
    rng = np.random.default_rng(seed)
    hits = 0
    for j in range(m):
        others = np.delete(np.arange(m), j)
        for _ in range(trials):
            distractors = rng.choice(others, n - 1, replace=False)
            hits += bool(np.all(corr[distractors, j] < corr[j, j]))
    return hits / (m * trials)


def n_way_top1_classification(gt_probs: np.ndarray, rec_probs: np.ndarray, n: int, trials: int = 100,
                              seed: int = 0) -> float:
    """MinD-Video's n-way top-1 accuracy from (items, classes) classifier probabilities."""
    g, r = np.asarray(gt_probs, np.float64), np.asarray(rec_probs, np.float64)
    if g.shape != r.shape or g.ndim != 2:
        raise UserError(f"class probabilities must be equal (items, classes) arrays, got {g.shape} and {r.shape}")
    _check_n(n, g.shape[1], "classification")
    rng = np.random.default_rng(seed)
    hits = 0
    for truth, probs in zip(g.argmax(1), r):
        others = np.delete(np.arange(g.shape[1]), truth)
        for _ in range(trials):
            hits += bool(probs[truth] > probs[rng.choice(others, n - 1, replace=False)].max())
    return hits / (len(g) * trials)
