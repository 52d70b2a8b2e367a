"""Closed-form ridge from voxels to cached CLIP targets (the Brain-Diffuser baseline, done well).

One estimator, :class:`RidgeAdapter`, fits every requested target array of the CLIP cache
(``image_embeds`` (N, D), ``layers/<name>`` (N, T, C), ``text_embeds`` (N, K, D)) from the betas
``X`` (n, V), choosing the ridge penalty by grouped K-fold cross-validation.

Usage (what the ``fit-adapters --method ridge`` stage does)::

    from pipeline.fitting.adapters.ridge import RidgeAdapter

    adapter = RidgeAdapter(alphas=np.logspace(1, 7, 13), cv=5, alpha_per="target")
    adapter.fit(X, {"image_embeds": clip["image_embeds"], "layers/24": clip["layers/24"]},
                groups=image_ids, rows=image_ids, out=run_dir / "adapters" / "ridge")
    for name, columns, block in adapter.iter_predict(X_test):   # stream into predictions.zarr
        predictions[name][:, columns] = block
    adapter = RidgeAdapter.load(run_dir / "adapters" / "ridge")  # same predictions, bit for bit

Arguments and what they buy:

- ``targets`` maps a name to an array-like with rows first (numpy, ``zarr.Array``, dask,
  h5py). It is never read whole: blocks of ``n_targets_batch`` columns (whole entries of axis 1,
  rounded to the array's chunking of axis 1) are read, fitted, written and dropped. Memory is the
  same whatever the target size: about ``4 * (3n + 3r) * n_targets_batch`` bytes for a block plus
  ``4 * ((K + 1) * n + V) * r`` for the decompositions of X (K folds, ``r = min(n, V)``, float32);
  n=4000, V=2000, 4096 columns: ~0.7 GB measured. An on-disk target whose chunks hold whole rows
  (the CLIP cache's layout) is first staged: its used rows are copied once, slab by slab, into a
  scratch Zarr chunked by column block (in ``out``, removed after), so no chunk is decoded once per
  block. ``rows`` (optional, length n) says which target row each X row uses, e.g. the 73k image
  id of each trial, so targets can be the whole CLIP cache (rows repeated for repeats are read once).
- ``groups`` (length n, e.g. the image id): rows sharing a group are always in the same fold, so
  repeats of one image never straddle train and validation. Folds are deterministic given ``seed``.
  ``cv`` is the number of folds or an explicit list of (train, validation) index pairs.
- ``alpha_per``: ``"target"`` picks one alpha per output column, ``"token"`` one per entry of
  axis 1 (per token of a layer, per caption of ``text_embeds``), ``"array"`` one per target array.
  The CV score is R^2 per column and fold, averaged over folds (and over the columns of a group);
  exact ties go to the larger alpha.
- ``rescale``: Brain-Diffuser's post-hoc step; each predicted column is z-scored over the rows of
  the ``predict`` call and mapped to the training targets' mean and std (needs >= 2 rows).
- ``backend``: the solver, ``"torch"`` (``"auto"``) or ``"numpy"``; ``device`` where torch
  computes (``"auto"``: CUDA when present), an execution choice that ``config.json`` records apart
  from the parameters, so a fit made on a GPU loads and predicts on a CPU-only machine (an older
  run's ``"torch_cuda"`` reads as torch); ``dtype`` is the compute precision.
- ``coef_dtype``: storage of the coefficients, ``"float32"`` or ``"float16"`` (half the disk; a
  257x768 layer from 15k voxels is 3.0 billion weights, 11.8 GB in float32).

Algorithm: each fold's centred training design is diagonalised once (eigendecomposition of the
smaller of ``X^T X`` and ``X X^T``, see :func:`decompose`); for a target block, ``M^T Y`` is formed
once per fold and the validation predictions of every alpha are ``A diag(1/(lam+alpha)) M^T Y``,
so each alpha costs one (n_val, r) x (r, b) product. The refit reuses the decomposition of all
rows. Memory knobs are explicit arguments, as in himalaya.

Saved adapter (``out`` or :meth:`save`): ``config.json`` (every parameter, each target's shape and
chosen alpha: the value for ``alpha_per="array"``, else a count per grid value; written last, so a
folder without it is incomplete) and ``weights.safetensors`` with, per target ``<name>``:
``coef/<name>`` (n_columns, V) in ``coef_dtype`` (rows = flattened columns of the target, the
layout of ``torch.nn.Linear.weight``), ``intercept/<name>``, ``alpha/<name>``, ``cv_score/<name>``
(best CV R^2 per column), ``y_mean/<name>``, ``y_std/<name>`` ((n_columns,) float32; ``alpha`` in
float64, exactly the grid values), and ``x_mean`` (1, V).
Predictions are ``X @ coef.T + intercept``. The weights file is written and read block by block
with plain file I/O, never mapped whole, so fitting and predicting stay within bounded memory.
Without ``out`` the adapter lives in a temporary folder removed with the object.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from ...store import read_json, write_text
from ..backend import Backend, get_backend, split_backend
from .ridge_blocks import RowIndex, TargetLayout, TensorFile, axis1_chunk, block_reader, progress_items, target_layout
from .ridge_solvers import (
    Decomposition,
    column_stats,
    cv_r2,
    decompose,
    grouped_folds,
    refit,
    rescale_columns,
    select_alphas,
    shrinkage,
)

ALPHA_PER = ("target", "token", "array")
CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1
FLOAT_DTYPES = ("float32", "float64")
COEF_DTYPES = ("float32", "float16")
PREDICT_TENSORS = ("coef", "intercept", "y_mean", "y_std")  # per target, read block by block to predict




def _check_X(X: Any, what: str, n_features: int | None = None) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise UserError(f"{what}: expected a 2-D (rows, voxels) array, got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise UserError(f"{what}: {X.shape[1]} voxels, but the adapter was fitted on {n_features}")
    bad = ~np.isfinite(X)
    if bad.any():
        voxels = np.flatnonzero(bad.any(0))
        raise UserError(
            f"{what}: {int(bad.sum())} NaN/inf values in {len(voxels)} voxel(s) (first: voxel {voxels[0]}); "
            "drop or fill those voxels before fitting"
        )
    return X


def _check_alphas(alphas: Any) -> np.ndarray:
    grid = np.unique(np.asarray(alphas, dtype=np.float64).ravel())
    if grid.size == 0:
        raise UserError("ridge alphas: the alpha grid is empty; give at least one positive value")
    if not np.all(np.isfinite(grid)) or grid[0] <= 0:
        raise UserError(f"ridge alphas: every alpha must be positive and finite, got {grid.tolist()}")
    return grid


def _check_rows(rows: Any, n: int) -> RowIndex:
    if rows is None:
        return slice(None), None
    rows = np.asarray(rows)
    if rows.shape != (n,) or not np.issubdtype(rows.dtype, np.integer) or (n and rows.min() < 0):
        raise UserError(
            f"ridge rows: expected {n} non-negative integer target rows (one per X row), got {rows.dtype} {rows.shape}"
        )
    return np.unique(rows, return_inverse=True)


def _check_targets(targets: Mapping[str, Any], n: int, rows: RowIndex) -> None:
    if not targets:
        raise UserError("ridge targets: no target arrays given")
    for name, array in targets.items():
        n_rows = array.shape[0] if len(array.shape) else 0
        if rows[1] is None and n_rows != n:
            raise UserError(f"ridge target {name!r}: {n_rows} rows, but X has {n} rows")
        if rows[1] is not None and n and rows[0][-1] >= n_rows:
            raise UserError(f"ridge target {name!r}: rows index up to {rows[0][-1]}, but it has {n_rows} rows")


@dataclass
class _Solver:
    """Everything a fit computes once from X: the backend, the fold and full decompositions, the grid."""

    xp: Backend
    folds: list[Decomposition]
    full: Decomposition
    grid: np.ndarray  # sorted alphas (host)
    alphas: Any  # the same, on the backend
    factors: Any  # (r, n_alphas) filter factors of the refit
    x_mean: np.ndarray  # (V,) on the host, in the compute dtype
    fit_intercept: bool

    @classmethod
    def build(
        cls, xp: Backend, X: np.ndarray, splits: Sequence, grid: np.ndarray, fit_intercept: bool, dtype: str
    ) -> _Solver:
        Xb = xp.asarray(X, dtype)
        folds = [decompose(xp, Xb, train, val, fit_intercept) for train, val in splits]
        full = decompose(xp, Xb, np.arange(len(X)), None, fit_intercept)
        alphas = xp.asarray(grid, dtype)
        x_mean = xp.to_numpy(full.x_mean)
        return cls(xp, folds, full, grid, alphas, shrinkage(full.lam, alphas).T, x_mean, fit_intercept)

    def scores(self, Y: Any) -> np.ndarray:
        return self.xp.to_numpy(cv_r2(self.xp, self.folds, Y, self.alphas, self.fit_intercept)).astype(np.float64)

    def refit(self, Y: Any, best: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coef, offset = refit(self.full, Y, self.factors[:, self.xp.asarray(best, None)], self.fit_intercept)
        return self.xp.to_numpy(coef), self.xp.to_numpy(offset)


class RidgeAdapter:
    """Voxels -> CLIP targets by ridge with grouped-CV alphas; see the module docstring."""

    def __init__(
        self,
        alphas: Sequence[float] = tuple(np.logspace(1, 7, 13)),
        cv: int | Sequence[tuple[np.ndarray, np.ndarray]] = 5,
        alpha_per: str = "target",
        fit_intercept: bool = True,
        rescale: bool = False,
        n_targets_batch: int = 4096,
        backend: str = "auto",
        dtype: str = "float32",
        coef_dtype: str = "float32",
        seed: int = 0,
        progress: bool = False,
        device: str = "auto",
    ):
        self.alphas = [float(a) for a in alphas]
        self.cv = cv
        self.alpha_per = alpha_per
        self.fit_intercept = fit_intercept
        self.rescale = rescale
        self.n_targets_batch = int(n_targets_batch)
        self.backend, implied = split_backend(backend)
        self.device = implied if implied and device == "auto" else device
        self.dtype = dtype
        self.coef_dtype = coef_dtype
        self.seed = seed
        self.progress = progress
        self.path_: Path | None = None
        self.fitted_on_: str | None = None  # the device the fit ran on (config.json "device")
        self.targets_: dict[str, dict[str, Any]] = {}

    def _params(self) -> dict[str, Any]:
        """Constructor arguments as saved in config.json (given folds are saved as their count)."""
        n_splits = self.cv if isinstance(self.cv, int) else len(self.cv)
        return dict(
            alphas=self.alphas, cv=n_splits, alpha_per=self.alpha_per, fit_intercept=self.fit_intercept,
            rescale=self.rescale, n_targets_batch=self.n_targets_batch, backend=self.backend,
            dtype=self.dtype, coef_dtype=self.coef_dtype, seed=self.seed,
        )  # fmt: skip

    def _check_params(self) -> np.ndarray:
        for key, value, allowed in [
            ("alpha_per", self.alpha_per, ALPHA_PER),
            ("dtype", self.dtype, FLOAT_DTYPES),
            ("coef_dtype", self.coef_dtype, COEF_DTYPES),
        ]:
            if value not in allowed:
                raise UserError(f"ridge {key}: {value!r} is not one of {', '.join(allowed)}")
        if self.n_targets_batch < 1:
            raise UserError(f"ridge n_targets_batch: must be >= 1, got {self.n_targets_batch}")
        return _check_alphas(self.alphas)

    # -- fit ----------------------------------------------------------------------------------

    def fit(
        self,
        X: Any,
        targets: Mapping[str, Any],
        groups: Any = None,
        rows: Any = None,
        out: Path | None = None,
    ) -> RidgeAdapter:
        """Fit one ridge per target array and write the adapter to ``out`` (or a temporary folder).

        X (n, V) betas; ``targets`` name -> (N, ...) array-like; ``rows`` (n,) target row of each X
        row (default: row i of X is row i of every target); ``groups`` (n,) labels that must not
        straddle folds (default: every row its own group).
        """
        grid = self._check_params()
        X = _check_X(X, "ridge X (betas)")
        n, n_voxels = X.shape
        row_index = _check_rows(rows, n)
        _check_targets(targets, n, row_index)
        groups = np.arange(n) if groups is None else np.asarray(groups)
        if groups.shape != (n,):
            raise UserError(f"ridge groups: expected {n} labels (one per X row), got shape {groups.shape}")
        splits = grouped_folds(groups, self.cv, self.seed) if isinstance(self.cv, int) else list(self.cv)

        xp = get_backend(self.backend, self.device)
        self.fitted_on_ = xp.device
        solver = _Solver.build(xp, X, splits, grid, self.fit_intercept, self.dtype)
        layouts = {
            name: target_layout(a.shape[1:], self.n_targets_batch, axis1_chunk(a)) for name, a in targets.items()
        }
        out = self._prepare_out(out)
        weights = TensorFile.create(out / WEIGHTS, self._specs(layouts, n_voxels))
        weights.write("x_mean", 0, solver.x_mean[None])
        self.targets_ = {}
        for name, array in targets.items():
            with block_reader(array, row_index, layouts[name], name, out, self.progress) as read:
                self.targets_[name] = self._fit_target(solver, weights, name, read, layouts[name])
        self.n_features_in_, self.n_samples_ = n_voxels, n
        self._attach(out, weights)
        self._write_config(out)
        return self

    def _fit_target(
        self, solver: _Solver, weights: TensorFile, name: str, read: Callable, layout: TargetLayout
    ) -> dict[str, Any]:
        """CV scores and refit of one target array, block by block; returns its config entry.

        With one alpha per column or per token a block is refitted as soon as it is scored (one
        read of the targets); one alpha per array needs every score first, then a second read.
        """
        xp, grid = solver.xp, solver.grid
        group = {"target": None, "token": layout.unit, "array": 0}[self.alpha_per]
        local = group != 0
        scores = np.empty((len(grid), layout.n_columns), np.float64)
        blocks = list(layout.blocks())
        for axis1, cols in progress_items(blocks, self.progress, f"ridge CV {name}"):
            Y = xp.asarray(read(axis1), self.dtype)
            scores[:, cols] = solver.scores(Y)
            if local:
                self._write_block(solver, weights, name, cols, Y, select_alphas(scores[:, cols], grid, group), scores)
        if not local:
            best = select_alphas(scores, grid, group)
            for axis1, cols in progress_items(blocks, self.progress, f"ridge refit {name}"):
                self._write_block(solver, weights, name, cols, xp.asarray(read(axis1), self.dtype), best[cols], scores)
        chosen = weights.read(f"alpha/{name}")
        values, counts = np.unique(chosen, return_counts=True)
        info: dict[str, Any] = {"shape": list(layout.shape)}
        if self.alpha_per == "array":
            info["alpha"] = float(values[0])
        else:
            info["alpha_counts"] = {repr(float(v)): int(c) for v, c in zip(values, counts)}
        info["cv_score_mean"] = float(weights.read(f"cv_score/{name}").mean())
        return info

    def _specs(self, layouts: Mapping[str, TargetLayout], n_voxels: int) -> dict[str, tuple[tuple[int, ...], str]]:
        specs: dict[str, tuple[tuple[int, ...], str]] = {"x_mean": ((1, n_voxels), "float32")}
        for name, layout in layouts.items():
            specs[f"coef/{name}"] = ((layout.n_columns, n_voxels), self.coef_dtype)
            specs[f"alpha/{name}"] = ((layout.n_columns,), "float64")  # exactly the grid values
            for kind in ("intercept", "cv_score", "y_mean", "y_std"):
                specs[f"{kind}/{name}"] = ((layout.n_columns,), "float32")
        return specs

    def _write_block(
        self, solver: _Solver, weights: TensorFile, name: str, cols: slice, Y: Any, best: np.ndarray, scores: np.ndarray
    ) -> None:
        """Refit one column block with its chosen alphas (``best``) and write every per-column tensor."""
        coef, offset = solver.refit(Y, best)
        coef = coef.astype(self.coef_dtype)
        if not np.isfinite(coef).all():
            raise UserError(f"ridge target {name!r}: coefficients overflow {self.coef_dtype}; use coef_dtype float32")
        y_mean, y_std = (solver.xp.to_numpy(v) for v in column_stats(Y))
        for kind, values in {
            "coef": coef,
            "intercept": offset - coef.astype(self.dtype, copy=False) @ solver.x_mean,  # stored coefficients
            "alpha": solver.grid[best],
            "cv_score": scores[best, np.arange(cols.start, cols.stop)],
            "y_mean": y_mean,
            "y_std": y_std,
        }.items():
            weights.write(f"{kind}/{name}", cols.start, values)

    # -- predict ------------------------------------------------------------------------------

    def iter_predict(self, X: Any) -> Iterator[tuple[str, slice, np.ndarray]]:
        """Predictions block by block: (target name, axis-1 slice, (m, k, *shape[1:]) float32)."""
        self._check_fitted()
        X = _check_X(X, "ridge predict X (betas)", self.n_features_in_)
        if self.rescale and len(X) < 2:
            raise UserError("ridge predict: rescale=True z-scores over rows, so it needs at least 2 rows")
        xp = get_backend(self.backend, self.device)
        Xb = xp.asarray(X, self.dtype)
        for name, info in self.targets_.items():
            layout = target_layout(info["shape"], self.n_targets_batch)
            for axis1, cols in layout.blocks():
                part = {kind: self._weights.read(f"{kind}/{name}", cols.start, cols.stop) for kind in PREDICT_TENSORS}
                coef, intercept = (xp.asarray(part[kind], self.dtype) for kind in ("coef", "intercept"))
                P = xp.to_numpy(Xb @ coef.T + intercept)
                if self.rescale:
                    P = rescale_columns(P.astype(np.float64), part["y_mean"], part["y_std"])
                yield name, axis1, P.astype(np.float32).reshape(len(P), -1, *layout.shape[1:])

    def predict(self, X: Any) -> dict[str, np.ndarray]:
        """All predictions in memory: name -> (m, *target shape) float32."""
        out = {name: np.empty((len(X), *info["shape"]), np.float32) for name, info in self.targets_.items()}
        for name, axis1, block in self.iter_predict(X):
            out[name][:, axis1] = block
        return out

    def coef(self, name: str) -> np.ndarray:
        """Coefficients (n_columns, V) of one target, read whole (mind the size)."""
        return self._read(f"coef/{name}")

    def intercept(self, name: str) -> np.ndarray:
        return self._read(f"intercept/{name}")

    def alpha(self, name: str) -> np.ndarray:
        """The chosen alpha of each flattened column of one target."""
        return self._read(f"alpha/{name}")

    def cv_score(self, name: str) -> np.ndarray:
        """Cross-validated R^2 at the chosen alpha, per flattened column of one target."""
        return self._read(f"cv_score/{name}")

    def _read(self, key: str) -> np.ndarray:
        self._check_fitted()
        if key not in self._weights.header:
            raise UserError(f"ridge adapter: no target {key.split('/', 1)[1]!r} (has {', '.join(self.targets_)})")
        return self._weights.read(key)

    # -- persistence --------------------------------------------------------------------------

    def save(self, out: Path) -> Path:
        """Copy the fitted adapter to ``out`` (config.json + weights.safetensors)."""
        self._check_fitted()
        out = Path(out)
        if not out.exists() or not out.samefile(self.path_):
            out = self._prepare_out(out)
            shutil.copyfile(self.path_ / WEIGHTS, out / WEIGHTS)
            self._write_config(out)
        return out

    @classmethod
    def load(cls, path: Path, backend: str | None = None, device: str = "auto") -> RidgeAdapter:
        """Reload a saved adapter to predict on ``device``; ``backend`` overrides the solver it was fitted with."""
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise UserError(f"{path}: not a complete ridge adapter (expected {CONFIG} and {WEIGHTS})")
        config = read_json(path / CONFIG)
        if config.get("method") != "ridge" or config.get("format") != FORMAT:
            raise UserError(f"{path / CONFIG}: not a ridge adapter of format {FORMAT}")
        params = dict(config["params"], **({} if backend is None else {"backend": backend}))
        params["backend"] = split_backend(params["backend"])[0]  # the device it was fitted on is not required
        adapter = cls(**params, device=device)
        adapter.fitted_on_ = config.get("device")
        adapter.targets_ = config["targets"]
        adapter.n_features_in_, adapter.n_samples_ = config["n_features"], config["n_samples"]
        adapter._attach(path, TensorFile.open(path / WEIGHTS))
        return adapter

    def _prepare_out(self, out: Path | None) -> Path:
        if out is None:
            out = Path(tempfile.mkdtemp(prefix="ridge-adapter-"))
            weakref.finalize(self, shutil.rmtree, out, True)
            return out
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).unlink(missing_ok=True)  # an unfinished folder must not look complete
        return out

    def _attach(self, path: Path, weights: TensorFile) -> None:
        self.path_, self._weights = path, weights

    def _write_config(self, out: Path) -> None:
        config = {
            "method": "ridge",
            "format": FORMAT,
            "params": self._params(),
            "n_features": self.n_features_in_,
            "n_samples": self.n_samples_,
            "device": self.fitted_on_,  # where the fit ran; predicting may run anywhere
            "targets": self.targets_,
            "weights": WEIGHTS,
        }
        write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")

    def _check_fitted(self) -> None:
        if self.path_ is None:
            raise ValueError("ridge adapter: not fitted (call fit or load first)")
