"""Grouped folds and the pure ridge solver functions (backend arrays in, backend arrays out).

See :mod:`.ridge` for the algorithm; :class:`.ridge.RidgeAdapter` is the thin estimator on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import UserError
from ..backend import Backend


def grouped_folds(groups: np.ndarray, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of row indices in which every group (e.g. image id) lies in exactly one fold.

    Groups are shuffled with ``seed`` and dealt into ``n_splits`` near-equal runs of groups.
    """
    labels, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if n_splits < 2 or n_splits > len(labels):
        raise UserError(f"ridge cv: {n_splits} folds need between 2 and {len(labels)} (the number of groups)")
    order = np.random.default_rng(seed).permutation(len(labels))
    fold_of_group = np.empty(len(labels), np.int64)
    for k, members in enumerate(np.array_split(order, n_splits)):
        fold_of_group[members] = k
    fold = fold_of_group[inverse]
    return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(n_splits)]


def column_offset(Y: Any, fit_intercept: bool) -> Any:
    """The per-column mean ridge centres on, or zeros without an intercept."""
    mean = Y.mean(0)
    return mean if fit_intercept else mean * 0


@dataclass
class Decomposition:
    """One training design, diagonalised: ``Xc^T Y`` seen through ``M``, filtered by ``1/(lam+alpha)``.

    Primal (n_train >= V): ``Xc^T Xc = W diag(lam) W^T``, ``M = Xc W``, ``B = W``.
    Dual (n_train < V): ``Xc Xc^T = U diag(lam) U^T``, ``M = U``, ``B = Xc^T U``.
    Either way the ridge coefficients are ``B diag(1/(lam+alpha)) M^T Yc`` (V, b). A CV fold keeps
    ``A = (X[val] - x_mean) B`` instead of ``B``: its validation predictions are ``A diag(f) M^T Yc``.
    """

    train: Any  # row indices
    M: Any  # (n_train, r)
    lam: Any  # (r,) eigenvalues, clipped at 0
    x_mean: Any  # (V,)
    B: Any = None  # (V, r), for the refit on all rows
    val: Any = None  # row indices of a CV fold
    A: Any = None  # (n_val, r), for a CV fold


def decompose(xp: Backend, X: Any, train: np.ndarray, val: np.ndarray | None, fit_intercept: bool) -> Decomposition:
    """Diagonalise ``X[train]`` centred on its own mean (when fitting an intercept).

    The eigendecomposition of the smaller Gram matrix is several times cheaper than an SVD; the
    filter ``1/(lam+alpha)`` never divides by a small singular value. In float32, directions with
    eigenvalues below ~1e-6 of the largest are resolved only to that precision: with alphas that
    small, use dtype float64.
    """
    train_b = xp.asarray(train, None)
    Xc = X[train_b]
    x_mean = column_offset(Xc, fit_intercept)
    Xc -= x_mean
    if Xc.shape[0] >= Xc.shape[1]:
        lam, W = xp.eigh(Xc.T @ Xc)
        M, B = Xc @ W, W
    else:
        lam, M = xp.eigh(Xc @ Xc.T)
        B = Xc.T @ M
    lam = lam * (lam > 0)
    if val is None:
        return Decomposition(train_b, M, lam, x_mean, B=B)
    val_b = xp.asarray(val, None)
    return Decomposition(train_b, M, lam, x_mean, val=val_b, A=(X[val_b] - x_mean) @ B)


def shrinkage(lam: Any, alphas: Any) -> Any:
    """(n_alphas, r) ridge filter factors ``1 / (lam + alpha)``."""
    return 1 / (lam[None, :] + alphas[:, None])


def cv_r2(xp: Backend, folds: Sequence[Decomposition], Y: Any, alphas: Any, fit_intercept: bool) -> Any:
    """(n_alphas, b) validation R^2 of each alpha for each column of ``Y`` (n, b), mean over folds.

    ``M^T Y`` is formed once per fold; each alpha then costs one (n_val, r) x (r, b) product.
    A column constant on a validation fold scores 0 there (as in himalaya).
    """
    total = 0
    for f in folds:
        Ytr, resid = Y[f.train], Y[f.val]  # copies (integer indexing), centred in place below
        sst = _squared_error(resid - resid.mean(0), 0)
        y_mean = column_offset(Ytr, fit_intercept)
        Ytr -= y_mean
        resid -= y_mean
        Q = f.M.T @ Ytr
        del Ytr
        sse = xp.stack([_squared_error(f.A @ (d[:, None] * Q), resid) for d in shrinkage(f.lam, alphas)])
        r2 = 1 - sse / sst
        r2[:, sst == 0] = 0
        total = total + r2
    return total / len(folds)


def _squared_error(P: Any, Y: Any) -> Any:
    """Column sums of ``(P - Y)^2``, overwriting the temporary ``P`` to spare memory (blocks are big)."""
    P -= Y
    P *= P
    return P.sum(0)


def select_alphas(scores: np.ndarray, alphas: np.ndarray, group_size: int | None) -> np.ndarray:
    """Index into ``alphas`` of the best alpha for each column of ``scores`` (n_alphas, b).

    ``group_size`` None: per column; k: one alpha per run of k consecutive columns; 0: one for all.
    Exact ties go to the larger alpha.
    """
    n_alphas, n_cols = scores.shape
    repeat = {None: 1, 0: n_cols}.get(group_size, group_size)
    pooled = scores.reshape(n_alphas, n_cols // repeat, repeat).mean(2)
    descending = np.argsort(alphas, kind="stable")[::-1]
    return np.repeat(descending[np.argmax(pooled[descending], axis=0)], repeat)


def refit(full: Decomposition, Y: Any, factors: Any, fit_intercept: bool) -> tuple[Any, Any]:
    """Coefficients (b, V) for ``Y`` (n, b) on all rows, and the column offsets Y was centred on.

    ``factors`` (r, b) holds ``1 / (lam + alpha_j)`` for each column's chosen alpha. The intercept
    is ``offset - coef @ x_mean``, formed by the caller from the coefficients as stored.
    """
    y_offset = column_offset(Y, fit_intercept)
    return (full.B @ (factors * (full.M.T @ (Y - y_offset)))).T, y_offset


def column_stats(Y: Any) -> tuple[Any, Any]:
    """Per-column mean and (population) std, the statistics ``rescale`` maps predictions onto."""
    mean = Y.mean(0)
    return mean, (_squared_error(Y - mean, 0) / len(Y)) ** 0.5


def rescale_columns(P: np.ndarray, y_mean: np.ndarray, y_std: np.ndarray) -> np.ndarray:
    """Brain-Diffuser's rescaling: z-score each column over rows, then take the training mean/std."""
    std = P.std(0)
    return (P - P.mean(0)) / np.where(std > 0, std, 1) * y_std + y_mean
