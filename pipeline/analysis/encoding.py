"""The encoding direction (layer features -> voxels) and NSD's noise ceiling.

:func:`encode` fits one ridge per voxel from a layer's features on the training images, with the
penalty chosen per voxel by grouped K-fold cross-validation on the training images only, and
returns the predicted test betas. It is the project's ridge (:mod:`pipeline.fitting.adapters.
ridge_solvers`, the pure solvers under ``RidgeAdapter``) run in the other direction: the
"design" is the layer's features, the targets are the voxels. The test rows ride along as one
more "validation fold" of the decomposition of all training rows, so test predictions are
``A diag(1/(lam+alpha_v)) M^T Y`` and the (voxels x features) coefficients are never formed
(a flattened ViT-L/14 layer has 263k features). Voxels are processed in column blocks on the
backend (torch on CUDA when present). :func:`encode_gram` is the same ridge from the images'
Gram matrix alone, for features too wide to hold (``--features flatten``).

Noise ceiling (:func:`ncsnr`, :func:`noise_ceiling`): NSD's formula (Allen et al. 2022, "A
massive 7T fMRI dataset...", Methods "Noise ceiling"; the NSD data manual):

- on betas z-scored per voxel within each session, the noise variance is the variance of a
  voxel's betas across the repeats of one image, averaged over images; with unit total variance
  the signal variance is ``max(0, 1 - noise_var)`` and ``ncsnr = sqrt(signal_var) / sqrt(noise_var)``;
- the ceiling of a test set whose betas average ``n`` trials per image is
  ``NC = 100 * ncsnr^2 / (ncsnr^2 + 1/n)`` percent of variance; with 3, 2 or 1 trials for A, B, C
  images, ``1/n`` becomes ``(A/3 + B/2 + C/1) / (A + B + C)``, i.e. the mean of ``1/n_i``.

Deviations, all documented in the stage's output: NSD averages the across-repeat variance over
images with all 3 repeats; here every image with >= 2 trials contributes, pooled by degrees of
freedom (sum of squared deviations / sum of (n_i - 1)), which equals NSD's estimate when every
image has 3 trials and uses the 1- and 2-repeat images of subjects 3, 4, 6, 8 too. Betas not
z-scored per session (``prepare-fmri --zscore none``) are z-scored per voxel over each split's trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..fitting.adapters.ridge_solvers import Decomposition, cv_r2, decompose, grouped_folds, select_alphas, shrinkage
from ..fitting.backend import Backend, get_backend

DEFAULT_ALPHAS = tuple(10.0 ** np.arange(-1, 8))
"""Penalties for z-scored features: 0.1 .. 1e7 (the largest eigenvalue of a 9000-image, 1024-wide
layer is ~1e6-1e7)."""


# ---- per-image averaging ----------------------------------------------------------------------------
def average_by_image(betas: np.ndarray, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``betas`` averaged per image: (sorted unique ids, (n_images, V) float32 means, counts)."""
    ids, inverse, counts = np.unique(image_ids, return_inverse=True, return_counts=True)
    if len(ids) == len(image_ids):  # one row per image already (prepare-fmri stores them sorted: no copy)
        order = np.argsort(image_ids, kind="stable")
        sorted_rows = bool(np.all(order == np.arange(len(order))))
        return ids, np.asarray(betas if sorted_rows else betas[order], np.float32), counts
    sums = np.zeros((len(ids), betas.shape[1]), np.float64)
    np.add.at(sums, inverse, betas)
    return ids, (sums / counts[:, None]).astype(np.float32), counts


def standardizer(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 (mean, 1/std) of the training rows' columns, in float64 arithmetic (constant columns scale by 0).

    Statistics are per column, so a layer can be standardised one column block at a time."""
    mean = train.mean(0, dtype=np.float64)
    std = train.std(0, dtype=np.float64)
    scale = np.where(std > 0, 1 / np.where(std > 0, std, 1), 0).astype(np.float32)
    return mean.astype(np.float32), scale


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score features with the training rows' mean and std (constant features become 0)."""
    mean, scale = standardizer(train)
    return (train - mean) * scale, (test - mean) * scale


def pearson_columns(P: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """(V,) Pearson r between matching columns of ``P`` and ``Y`` (n, V); 0 where one is constant."""
    P = np.asarray(P, np.float64) - P.mean(0)
    Y = np.asarray(Y, np.float64) - Y.mean(0)
    denom = np.sqrt((P * P).sum(0) * (Y * Y).sum(0))
    return np.divide((P * Y).sum(0), denom, out=np.zeros(P.shape[1]), where=denom > 0)


# ---- ridge encoding --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodingConfig:
    """Ridge settings of the encoding models (the ``analyze_layers`` section of params.yaml)."""

    alphas: Sequence[float] = DEFAULT_ALPHAS
    cv: int = 5  # folds over training images
    voxels_batch: int = 4096  # voxel columns per block on the backend
    backend: str = "auto"  # the solver: auto (= torch) | torch | numpy
    device: str = "auto"  # where torch computes: auto (CUDA when present) | cpu | cuda[:K]
    dtype: str = "float32"
    seed: int = 0


def _grid(cfg: EncodingConfig) -> np.ndarray:
    grid = np.unique(np.asarray(cfg.alphas, np.float64))
    if grid.size == 0 or grid[0] <= 0:
        raise UserError(f"analyze-layers alphas: need positive penalties, got {list(cfg.alphas)}")
    return grid


def encode(
    X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray, groups: np.ndarray, cfg: EncodingConfig,
    xp: Backend | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted test betas (n_test, V) float32 and each voxel's chosen alpha (V,).

    ``X_*`` are (standardised) features, ``Y_train`` (n_train, V) betas, ``groups`` (n_train,)
    labels that never straddle folds (the image ids).
    """
    xp = xp or get_backend(cfg.backend, cfg.device)
    grid = _grid(cfg)
    n_train = len(X_train)
    X = xp.asarray(np.concatenate([X_train, X_test]), cfg.dtype)
    rows = np.arange(n_train)
    folds = [decompose(xp, X, rows[tr], rows[va], True) for tr, va in grouped_folds(groups, cfg.cv, cfg.seed)]
    test = decompose(xp, X, rows, np.arange(n_train, len(X)), True)
    del X
    return _predict(xp, folds, test, Y_train, len(X_test), grid, cfg)


def decompose_gram(xp: Backend, K: np.ndarray, train_k: np.ndarray, val_k: np.ndarray, train: np.ndarray,
                   val: np.ndarray, dtype: str) -> Decomposition:
    """:func:`decompose`'s dual form from the Gram matrix ``K = X X^T`` alone (X never formed).

    ``train_k`` / ``val_k`` index ``K``; ``train`` / ``val`` index the targets. With ``mu`` the mean
    of ``X[train_k]``, ``(x_a - mu).(x_b - mu) = K_ab - mean_j K_aj - mean_j K_jb + mean_ij K_ij``
    (j over training rows): the centred training Gram is eigendecomposed (``M = U``) and the
    validation rows see it through ``A = Kc[val, train] U``, exactly the dual ``(X[val] - mu) Xc^T U``.
    """
    Ktt = xp.asarray(K[np.ix_(train_k, train_k)], dtype)
    r = Ktt.mean(0)
    s = r.mean()
    Ktt -= r[None, :]
    Ktt -= r[:, None]
    Ktt += s
    lam, M = xp.eigh(Ktt)
    del Ktt
    Kvt = xp.asarray(K[np.ix_(val_k, train_k)], dtype)
    Kvt -= Kvt.mean(1)[:, None]
    Kvt -= r[None, :]
    Kvt += s
    return Decomposition(xp.asarray(train, None), M, lam * (lam > 0), None, val=xp.asarray(val, None), A=Kvt @ M)


def encode_gram(
    K: np.ndarray, train_k: np.ndarray, test_k: np.ndarray, Y_train: np.ndarray, groups: np.ndarray,
    cfg: EncodingConfig, xp: Backend | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode` from the Gram matrix ``K`` of the (standardised) features of every image:
    rows ``train_k`` of ``K`` are ``Y_train``'s rows, ``test_k`` the test images. The same numbers
    as :func:`encode` on those features (its dual form), in O(n^2) memory whatever their width.
    """
    xp = xp or get_backend(cfg.backend, cfg.device)
    grid = _grid(cfg)
    rows = np.arange(len(train_k))
    folds = [decompose_gram(xp, K, train_k[tr], train_k[va], tr, va, cfg.dtype)
             for tr, va in grouped_folds(groups, cfg.cv, cfg.seed)]
    test = decompose_gram(xp, K, train_k, test_k, rows, np.arange(len(test_k)), cfg.dtype)
    return _predict(xp, folds, test, Y_train, len(test_k), grid, cfg)


def _predict(xp: Backend, folds: list[Decomposition], test: Decomposition, Y_train: np.ndarray, n_test: int,
             grid: np.ndarray, cfg: EncodingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel block: CV scores of every alpha, the best one, and the test predictions with it."""
    alphas = xp.asarray(grid, cfg.dtype)
    factors = shrinkage(test.lam, alphas).T  # (r, n_alphas)
    pred = np.empty((n_test, Y_train.shape[1]), np.float32)
    chosen = np.empty(Y_train.shape[1], np.float64)
    for start in range(0, Y_train.shape[1], cfg.voxels_batch):
        cols = slice(start, start + cfg.voxels_batch)
        Y = xp.asarray(Y_train[:, cols], cfg.dtype)
        scores = xp.to_numpy(cv_r2(xp, folds, Y, alphas, True)).astype(np.float64)
        best = select_alphas(scores, grid, None)
        y_mean = Y.mean(0)
        Q = test.M.T @ (Y - y_mean)
        pred[:, cols] = xp.to_numpy(test.A @ (factors[:, xp.asarray(best, None)] * Q) + y_mean)
        chosen[cols] = grid[best]
    return pred, chosen


# ---- noise ceiling ---------------------------------------------------------------------------------
def repeat_noise(betas: np.ndarray, image_ids: np.ndarray, zscored: bool = True, block: int = 2048
                 ) -> tuple[np.ndarray, int, int]:
    """Across-repeat noise of single-trial betas (n_trials, V): per-voxel sum of squared deviations
    from each image's mean, its degrees of freedom (sum of n_i - 1), and the number of repeated images.

    Summed over stores or splits whose images do not overlap, these pool into one estimate. Voxels
    are processed ``block`` at a time in float64, so memory stays near the input's size.
    ``zscored``: the betas are z-scored per voxel within sessions (NSD's input); otherwise each
    voxel is z-scored over the given trials first.
    """
    ids, inverse, counts = np.unique(image_ids, return_inverse=True, return_counts=True)
    keep = counts[inverse] >= 2
    inverse, rows = inverse[keep], np.flatnonzero(keep)
    ss = np.zeros(betas.shape[1])
    for start in range(0, betas.shape[1], block):
        cols = slice(start, start + block)
        part = np.asarray(betas[:, cols], np.float64)
        if not zscored:
            std = part.std(0)
            part = (part - part.mean(0)) / np.where(std > 0, std, 1)
        part = part[rows]
        sums = np.zeros((len(ids), part.shape[1]))
        np.add.at(sums, inverse, part)
        part -= (sums / np.maximum(counts, 1)[:, None])[inverse]
        ss[cols] = (part * part).sum(0)
    repeated = counts >= 2
    return ss, int((counts[repeated] - 1).sum()), int(repeated.sum())


def ncsnr(ss: np.ndarray, df: int) -> np.ndarray:
    """(V,) NSD's noise-ceiling SNR from :func:`repeat_noise`'s pooled sum of squares and its df."""
    if df < 1:
        raise UserError("noise ceiling: no image has two or more trials")
    noise_var = np.asarray(ss, np.float64) / df
    signal_var = np.maximum(0, 1 - noise_var)
    return np.divide(np.sqrt(signal_var), np.sqrt(noise_var), out=np.zeros_like(noise_var), where=noise_var > 0)


def noise_ceiling(snr: np.ndarray, trials_per_image: np.ndarray) -> np.ndarray:
    """(V,) NSD noise ceiling in percent of variance for test betas averaging ``trials_per_image``."""
    inv_n = float(np.mean(1 / np.asarray(trials_per_image, np.float64)))
    s2 = np.asarray(snr, np.float64) ** 2
    return 100 * s2 / (s2 + inv_n)
