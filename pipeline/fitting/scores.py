"""Scores of predicted vs true feature arrays: the primitives fit-adapters reports with and evaluate
builds on (:mod:`pipeline.evaluation.metrics` re-exports them with the reconstruction metrics).

- :func:`two_way_identification` — ME's all-pairs two-way identification on flattened features;
  ties (and NaN correlations of constant features) count as failures; chance is 0.5.
- :func:`retrieval_top1` — top-1 among ``pool`` random samples, ``draws`` draws, legacy NumPy seed;
  returns both directions in ME2's code orientation.
- :func:`prediction_quality` — mean Pearson r over columns, mean cosine over rows.
- :func:`mean_report` — the mean of the numbers several reports share (subjects of a run).

They live with fitting, the lower layer, so fitting never imports evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import UserError


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching rows of two (n, d) arrays; 0 where a row is constant."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    num = (a * b).sum(1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


# ---- feature comparisons -----------------------------------------------------------------------------
def check_feats(gt: np.ndarray, rec: np.ndarray, min_n: int = 1) -> None:
    if gt.shape != rec.shape:
        raise UserError(f"features differ in shape: ground truth {gt.shape}, reconstructions {rec.shape}")
    if len(gt) < min_n:
        raise UserError(f"need at least {min_n} images, got {len(gt)}")


def feature_rows(x: np.ndarray | torch.Tensor, what: str, dtype: type | None = None) -> np.ndarray:
    """(n, ...) features as (n, d) rows (cast to ``dtype`` when given)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim < 2:
        raise UserError(f"{what}: expected (n, ...) features, got shape {arr.shape}")
    arr = arr.reshape(len(arr), -1)
    return arr if dtype is None else arr.astype(dtype)


def cross_correlation(a: np.ndarray, b: np.ndarray, block: int = 1 << 14) -> np.ndarray:
    """(n, m) Pearson r between the rows of ``a`` (n, d) and ``b`` (m, d), in float64, NaN for a
    constant row. Accumulated over column blocks, so only ``block`` columns are ever upcast: the
    features can stay float32 (AlexNet(2) of 1000 images is 0.7 GB as float32, 1.5 GB as float64)."""
    ma, mb = a.mean(1, dtype=np.float64), b.mean(1, dtype=np.float64)
    dot, na, nb = np.zeros((len(a), len(b))), np.zeros(len(a)), np.zeros(len(b))
    for start in range(0, a.shape[1], block):
        ab = a[:, start : start + block].astype(np.float64) - ma[:, None]
        bb = b[:, start : start + block].astype(np.float64) - mb[:, None]
        dot += ab @ bb.T
        na += (ab * ab).sum(1)
        nb += (bb * bb).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return dot / np.sqrt(na)[:, None] / np.sqrt(nb)[None, :]


def two_way_identification(gt_feats: np.ndarray, rec_feats: np.ndarray) -> float:
    """ME/BD two-way identification: mean over reconstructions j of the fraction of distractor GTs i
    with ``corr(GT_i, rec_j) < corr(GT_j, rec_j)``; all n(n-1) pairs, ties fail, chance 0.5.

    Correlations in float64 on the flattened features (n x d; AlexNet(2) at 256 px has d = 184,512),
    accumulated in column blocks (:func:`cross_correlation`).
    """
    return two_way_value(two_way_failures(gt_feats, rec_feats))


def two_way_failures(gt_feats: np.ndarray, rec_feats: np.ndarray) -> np.ndarray:
    """(n, n) bool: ``fail[i, j]`` = distractor GT i does not correlate less with rec j than GT j
    does (ties and NaN fail); diagonal False. The per-image form of :func:`two_way_identification`
    that :mod:`pipeline.evaluation.bootstrap` resamples."""
    g, r = feature_rows(gt_feats, "gt_feats"), feature_rows(rec_feats, "rec_feats")
    check_feats(g, r, min_n=2)
    corr = cross_correlation(g, r)  # corr[i, j] = r(GT_i, rec_j); NaN for constant rows
    with np.errstate(invalid="ignore"):
        fail = ~(corr < np.diag(corr)[None, :])
    np.fill_diagonal(fail, False)
    return fail


def two_way_value(fail: np.ndarray) -> float:
    """Two-way identification from its (n, n) failure matrix (:func:`two_way_failures`)."""
    n = len(fail)
    return float(((n - 1) - fail.sum(0)).mean() / (n - 1))


def correlation_distance_each(gt_feats: np.ndarray, rec_feats: np.ndarray) -> np.ndarray:
    """Per-image ``1 - Pearson r`` (see :func:`correlation_distance`)."""
    g, r = feature_rows(gt_feats, "gt_feats", np.float64), feature_rows(rec_feats, "rec_feats", np.float64)
    check_feats(g, r)
    return 1.0 - rowwise_pearson(g, r)


def correlation_distance(gt_feats: np.ndarray, rec_feats: np.ndarray) -> float:
    """Mean over images of ``scipy.spatial.distance.correlation`` (1 - Pearson r); lower is better."""
    return float(correlation_distance_each(gt_feats, rec_feats).mean())


class Retrieval(NamedTuple):
    """Top-1 retrieval accuracies in ME2's code orientation (§5.4).

    ``image_to_brain`` is ME2's "fwd": rows are images, so for each image, is its own brain
    embedding the best match among the pool's brain embeddings. ``brain_to_image`` is "bwd". The
    ME2 subj01 notebook values (fwd 0.9996, bwd 0.9987) equal the paper's "image retrieval" and
    "brain retrieval" columns (99.96, 99.87) in that order.
    """

    image_to_brain: float
    brain_to_image: float


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)  # like torch.nn.functional.normalize


def _top1_correct(sim: np.ndarray) -> np.ndarray:
    """Row i is correct when its diagonal entry beats every other entry of the row (ties fail)."""
    diag = np.diag(sim)
    beaten = sim >= diag[:, None]
    np.fill_diagonal(beaten, False)
    return ~beaten.any(1)


def retrieval_top1(
    brain: np.ndarray, image: np.ndarray, pool: int = 300, draws: int = 30, seed: int = 42
) -> Retrieval:
    """ME2 retrieval: ``draws`` times pick ``pool`` samples without replacement (``np.random.seed(seed)``
    then ``np.random.choice``), flatten and L2-normalise, cosine similarity, top-1; mean over draws."""
    b, i = feature_rows(brain, "brain", np.float64), feature_rows(image, "image", np.float64)
    if len(b) != len(i):
        raise UserError(f"brain ({len(b)}) and image ({len(i)}) embeddings must have one row per test sample each")
    if b.shape[1] != i.shape[1]:
        raise UserError(f"brain embeddings have {b.shape[1]} values per row, image embeddings {i.shape[1]}")
    if not 2 <= pool <= len(b):
        raise UserError(f"retrieval pool must be between 2 and the number of test samples ({len(b)}), not {pool}")
    if draws < 1:
        raise UserError(f"retrieval draws must be >= 1, not {draws}")
    b, i = _unit_rows(b), _unit_rows(i)
    rng = np.random.RandomState(seed)
    fwd, bwd = [], []
    for _ in range(draws):
        idx = rng.choice(len(b), pool, replace=False)
        sim = i[idx] @ b[idx].T  # rows = images, columns = brain
        fwd.append(_top1_correct(sim).mean())
        bwd.append(_top1_correct(sim.T).mean())
    return Retrieval(float(np.mean(fwd)), float(np.mean(bwd)))


def retrieval_failures(brain: np.ndarray, image: np.ndarray) -> Retrieval:
    """(n, n) bool failure matrices of both retrieval directions over the whole test set:
    ``fail[i, j]`` = candidate i scores at least as high as item j's own match (diagonal False);
    :mod:`pipeline.evaluation.bootstrap` turns them into per-image expected top-1 accuracies for any pool size."""
    b = _unit_rows(feature_rows(brain, "brain", np.float64))
    i = _unit_rows(feature_rows(image, "image", np.float64))
    sim = i @ b.T  # rows = images, columns = brain
    diag = np.diag(sim)
    fwd, bwd = (sim >= diag[:, None]).T, sim >= diag[None, :]
    for fail in (fwd, bwd):
        np.fill_diagonal(fail, False)
    return Retrieval(fwd, bwd)


def _axis1_blocks(pred, true, max_values: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Matching (n, k) float64 blocks of two (n, ...) arrays, cut along axis 1 (numpy or zarr)."""
    n = pred.shape[0]
    per_entry = int(np.prod(pred.shape[2:], dtype=np.int64)) if len(pred.shape) > 2 else 1
    step = max(1, max_values // max(n * per_entry, 1))
    for start in range(0, pred.shape[1], step):
        sl = (slice(None), slice(start, start + step))
        yield (np.asarray(pred[sl]).reshape(n, -1).astype(np.float64),
               np.asarray(true[sl]).reshape(n, -1).astype(np.float64))


def prediction_quality(pred, true, max_values: int = 1 << 24) -> dict[str, float]:
    """Predicted vs true target arrays (n, ...): mean Pearson r over columns (each feature across
    samples) and mean cosine over rows (each sample across features).

    Reads both arrays in blocks along axis 1 of at most ``max_values`` values, so large token
    targets can stay lazy zarr arrays. Constant columns count as r = 0.
    """
    if tuple(pred.shape) != tuple(true.shape) or len(pred.shape) < 2:
        raise UserError(f"predictions {tuple(pred.shape)} and targets {tuple(true.shape)} must be equal (n, ...) arrays")
    n = pred.shape[0]
    if n < 2:
        raise UserError(f"need at least 2 samples to correlate, got {n}")
    dot, pp, tt = np.zeros(n), np.zeros(n), np.zeros(n)
    r_sum, n_cols = 0.0, 0
    for p, t in _axis1_blocks(pred, true, max_values):
        dot += (p * t).sum(1)
        pp += (p * p).sum(1)
        tt += (t * t).sum(1)
        r_sum += float(rowwise_pearson(p.T, t.T).sum())
        n_cols += p.shape[1]
    cos = np.divide(dot, np.sqrt(pp * tt), out=np.zeros(n), where=pp * tt > 0)
    return {"pearson_r": r_sum / n_cols, "cosine": float(cos.mean())}


def mean_report(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The mean of every number that all ``reports`` share, nested dicts alike (the published
    tables average subjects 1, 2, 5, 7 this way)."""
    out: dict[str, Any] = {}
    for key in reports[0]:
        values = [r.get(key) for r in reports]
        if all(isinstance(v, dict) for v in values):
            out[key] = mean_report(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = float(np.mean(values))
    return out
