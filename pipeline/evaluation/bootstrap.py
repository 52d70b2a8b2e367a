"""Percentile-bootstrap confidence intervals over test images (pure NumPy; no I/O).

Every draw resamples the ``n`` test items with replacement from ``np.random.default_rng(seed)``,
expressed as multiplicity weights ``w`` (draws, n) (:func:`resample_weights`), so one draw is
applied identically to every metric of a run, and to two runs in a paired comparison. The
interval is the 2.5 and 97.5 percentiles of the statistic over the draws (:func:`percentile_ci`).

Two kinds of statistic:

- a mean of per-image scores (PixCorr, SSIM, correlation distances): ``sum(w * s) / sum(w)``
  (:func:`mean_draws`);
- a pool statistic (two-way identification, top-1 retrieval, n-way identification): image ``j``
  is scored against distractors drawn from the same test set, so the pool must be resampled with
  the images. It is summarised by a failure matrix ``fail[i, j]`` = "distractor ``i`` beats or
  ties item ``j``" (diagonal False). For a pool of ``p`` items, item ``j``'s score is the
  probability that none of the ``p - 1`` distractors drawn without replacement from the others is
  a failure: ``C(others - fails, p - 1) / C(others, p - 1)``; ``p = 2`` is ME's two-way
  identification exactly, and ``p = 300`` the expectation of ME2's 30 random 300-pools.
  In a draw the others and the failures are counted in the *resampled* multiset (copies of
  ``j`` itself excluded), i.e. every resampled image is scored against a pool drawn from the
  resampled set (:func:`pool_draws`). Resampling only the per-image scores computed against the
  full pool would hold the distractor set fixed and miss half of the variance of a pairwise
  statistic (the distractor side of the U-statistic); recomputing from the matrix costs one
  (draws, n) x (n, n) product.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import gammaln

DRAWS = 1000
SEED = 0
LEVEL = 0.95


def resample_weights(n: int, draws: int = DRAWS, seed: int = SEED) -> np.ndarray:
    """(draws, n) float64 multiplicities of a bootstrap over ``n`` items (each row sums to n)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(draws, n))
    w = np.zeros((draws, n))
    np.add.at(w, (np.arange(draws)[:, None], idx), 1.0)
    return w


def percentile_ci(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """The central ``level`` percentile interval of bootstrap ``samples`` (NaN draws ignored)."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(np.asarray(samples, np.float64), [tail, 100 - tail])
    return [float(lo), float(hi)]


def mean_draws(scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(draws,) weighted means of per-image ``scores`` (n,) under bootstrap weights ``w``; NaN scores
    (images a metric leaves out) are left out of each draw's mean."""
    s = np.asarray(scores, np.float64)
    present = ~np.isnan(s)
    return (w @ np.where(present, s, 0.0)) / (w @ present)


def no_fail_probability(others: np.ndarray, fails: np.ndarray, pool: int) -> np.ndarray:
    """P(none of ``pool - 1`` distractors drawn without replacement from ``others`` items, ``fails``
    of them failures, is a failure); the pool is capped at ``others + 1``."""
    k = np.minimum(pool - 1, others).astype(np.float64)
    good = others - fails
    with np.errstate(invalid="ignore"):
        log = gammaln(good + 1) - gammaln(good - k + 1) - gammaln(others + 1) + gammaln(others - k + 1)
    return np.where(good >= k, np.exp(log), 0.0)


def pool_scores(fail: np.ndarray, pool: int) -> np.ndarray:
    """(n,) per-item scores against the full test set (the protocol's point value is their mean)."""
    f = np.asarray(fail, bool).copy()
    np.fill_diagonal(f, False)
    n = len(f)
    return no_fail_probability(np.full(n, n - 1.0), f.sum(0).astype(np.float64), pool)


def pool_draws(fail: np.ndarray, pool: int, w: np.ndarray) -> np.ndarray:
    """(draws,) pool statistic recomputed in each resampled set (see the module docstring)."""
    f = np.asarray(fail, bool).copy()
    np.fill_diagonal(f, False)
    fails = w @ f.astype(np.float64)  # (draws, n): weighted failures against item j
    others = w.sum(1, keepdims=True) - w
    scores = no_fail_probability(others, fails, pool)
    return (w * scores).sum(1) / w.sum(1)


def interval(value: float, draws: np.ndarray, n: int) -> dict[str, Any]:
    """``{"value", "ci95", "n"}`` of a point value and its bootstrap draws."""
    return {"value": float(value), "ci95": percentile_ci(draws), "n": int(n)}


def mean_interval(scores: np.ndarray, draws: int = DRAWS, seed: int = SEED) -> dict[str, Any]:
    """Mean of per-image ``scores`` with its 95 % percentile-bootstrap interval over images."""
    s = np.asarray(scores, np.float64)
    return interval(s.mean(), mean_draws(s, resample_weights(len(s), draws, seed)), len(s))


def subject_draws(per_subject: list[np.ndarray], seed: int = SEED) -> np.ndarray:
    """(draws,) mean over subjects resampled with replacement, each subject contributing its own
    image-bootstrap draw: the two-stage bootstrap of a subject-averaged metric."""
    stacked = np.stack(per_subject)  # (subjects, draws)
    s, draws = stacked.shape
    pick = np.random.default_rng([seed, 1]).integers(0, s, size=(draws, s))
    return stacked[pick, np.arange(draws)[:, None]].mean(1)


def pearson_draws(pred: np.ndarray, true: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(draws, V) Pearson r of matching columns of (n, V) arrays in each resampled set (weighted
    moments; 0 where a column is constant in the resample)."""
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    total = w.sum(1, keepdims=True)
    mp, mt = (w @ p) / total, (w @ t) / total
    cov = (w @ (p * t)) / total - mp * mt
    vp, vt = (w @ (p * p)) / total - mp**2, (w @ (t * t)) / total - mt**2
    den = np.sqrt(np.clip(vp, 0, None) * np.clip(vt, 0, None))
    return np.divide(cov, den, out=np.zeros_like(cov), where=den > 1e-12)


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """a - b from two statistics' draws under the same resamples: its interval and the one-sided
    bootstrap p-value that a is not larger (the fraction of draws with a - b <= 0)."""
    d = np.asarray(a) - np.asarray(b)
    ci = percentile_ci(d)
    return {"ci95": ci, "p": float(np.mean(d <= 0)), "better": bool(ci[0] > 0)}



def _pair_sums(w: np.ndarray, M: np.ndarray) -> np.ndarray:
    """(draws,) sum over pairs i < j of ``w_i w_j M_ij`` for a symmetric (n, n) ``M`` with zero diagonal."""
    return ((w @ M) * w).sum(1) / 2


def rdm_spearman_draws(rdm_a: np.ndarray, rdm_b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(draws,) Spearman correlation of two condensed RDMs of the same ``n`` conditions in each
    resampled set of conditions (weights ``w`` (draws, n)): pair (i, j) of distinct conditions counts
    ``w_i * w_j`` times and pairs of copies of one condition are left out (rsatoolbox's bootstrap over
    conditions does the same). The ranks are those of the full set (average ranks for ties), not
    recomputed in each resample: a resample's ranks are a monotone map within O(1/sqrt(n)) of them,
    and this keeps a draw at (n, n) matrix products (re-ranking costs a sort of n^2 / 2 pairs per draw)."""
    from scipy.spatial.distance import squareform
    from scipy.stats import rankdata

    w = np.asarray(w, np.float64)
    ranks = []
    for values in (rdm_a, rdm_b):
        r = rankdata(np.asarray(values, np.float64))
        if r.shape != (w.shape[1] * (w.shape[1] - 1) // 2,):
            raise ValueError(f"RDM of shape {r.shape} is not a condensed RDM of {w.shape[1]} conditions")
        ranks.append(squareform(r - r.mean()))  # centred: no cancellation in the moments below
    A, B = ranks
    total = (w.sum(1) ** 2 - (w * w).sum(1)) / 2  # the number of pairs of distinct conditions
    ma, mb = _pair_sums(w, A) / total, _pair_sums(w, B) / total
    cov = _pair_sums(w, A * B) / total - ma * mb
    var = (_pair_sums(w, A * A) / total - ma**2) * (_pair_sums(w, B * B) / total - mb**2)
    den = np.sqrt(np.clip(var, 0, None))
    return np.divide(cov, den, out=np.zeros_like(cov), where=den > 0)
