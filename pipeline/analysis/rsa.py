"""Representational geometry as pure numpy functions: RDMs, RSA and linear CKA.

- :func:`rdm`: the condensed representational dissimilarity matrix of n conditions (rows), with
  the correlation distance 1 - Pearson r between their patterns (rsatoolbox's ``calc_rdm(...,
  method="correlation")``; entries in the order of ``scipy.spatial.distance.squareform``, i.e.
  the upper triangle row by row).
- :func:`rsa`: the Spearman correlation between two RDMs (rsatoolbox's ``compare(...,
  method="spearman")``; ties get average ranks): condition-rich RSA as in the NSD literature
  (e.g. Allen et al. 2022, Conwell et al.).
- :func:`rdm_from_gram` / :func:`center_gram`: the same from the n x n Gram matrix ``X X^T`` alone
  (``analyze-layers --features flatten`` accumulates it over column blocks).
- :func:`centered_gram` / :func:`cka`: linear CKA (Kornblith et al. 2019),
  ``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, computed from the n x n
  centred Gram matrices ``<Kc, Lc>_F / (||Kc||_F ||Lc||_F)`` (the same number), so a layer is
  reduced to one (n, n) matrix whatever its width and any two layers compare in O(n^2).

Everything is computed in float64: RDM entries of 1000 images are differences of numbers close
to 1, and CKA of near-identical layers is a ratio of large, close sums.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ..errors import UserError


def _check_rows(X: np.ndarray, what: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 3:
        raise UserError(f"{what}: need a (conditions >= 3, features) array, got shape {X.shape}")
    return X


def correlation_matrix(X: np.ndarray) -> np.ndarray:
    """(n, n) Pearson r between the rows of ``X`` (n, F); a constant row correlates 0 with all."""
    X = _check_rows(X, "patterns")
    Z = X - X.mean(1, keepdims=True)
    norm = np.linalg.norm(Z, axis=1, keepdims=True)
    Z = np.divide(Z, norm, out=np.zeros_like(Z), where=norm > 0)
    return Z @ Z.T


def rdm(X: np.ndarray) -> np.ndarray:
    """Condensed RDM (n(n-1)/2,) of the rows of ``X``: 1 - Pearson r of every pair i < j."""
    return _condensed(correlation_matrix(X))


def _condensed(R: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(len(R), 1)
    return 1 - R[i, j]


def rdm_from_gram(G: np.ndarray, row_sums: np.ndarray, n_features: int) -> np.ndarray:
    """:func:`rdm` of rows ``X`` (n, F) given only ``G = X X^T``, ``X.sum(1)`` and F (float64).

    Centring each row on its own mean turns ``G_ij`` into ``G_ij - s_i s_j / F``; a row whose
    centred norm is within float64 rounding of 0 (a constant row) correlates 0 with all, as in
    :func:`correlation_matrix`."""
    G = np.asarray(G, np.float64)
    s = np.asarray(row_sums, np.float64)
    C = G - np.outer(s, s) / n_features
    d = np.diag(C).copy()
    ok = d > 1e-12 * np.maximum(np.diag(G), np.finfo(np.float64).tiny)
    inv = np.where(ok, 1 / np.sqrt(np.where(ok, d, 1)), 0)
    return _condensed(C * inv[:, None] * inv[None, :])


def rsa(rdm_a: np.ndarray, rdm_b: np.ndarray) -> float:
    """Spearman correlation of two condensed RDMs (Pearson r of their average ranks)."""
    a, b = rankdata(rdm_a), rankdata(rdm_b)
    if a.shape != b.shape:
        raise UserError(f"RSA: RDMs of different sizes {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else 0.0


def centered_gram(X: np.ndarray) -> np.ndarray:
    """(n, n) linear kernel of the column-centred rows of ``X``: what :func:`cka` compares."""
    X = _check_rows(X, "features")
    Xc = X - X.mean(0)
    return Xc @ Xc.T


def center_gram(G: np.ndarray) -> np.ndarray:
    """:func:`centered_gram` from the plain Gram matrix ``X X^T`` (float64): ``H G H`` with the
    centring matrix ``H = I - 11^T/n`` (double centring), i.e. columns of ``X`` centred."""
    G = np.asarray(G, np.float64)
    r = G.mean(0)
    return G - r[None, :] - r[:, None] + r.mean()


def cka(K: np.ndarray, L: np.ndarray) -> float:
    """Linear CKA of two layers given their :func:`centered_gram` matrices (0 when one is constant)."""
    denom = np.linalg.norm(K) * np.linalg.norm(L)
    return float(np.sum(K * L) / denom) if denom > 0 else 0.0


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA of two representations (n, F) and (n, G) of the same n conditions."""
    return cka(centered_gram(X), centered_gram(Y))
