"""Closed-form ridge from voxels to cached CLIP targets (the Brain-Diffuser baseline, done well).

One estimator, :class:`RidgeAdapter`, fits every requested target array of the CLIP cache
(``image_embeds`` (N, D), ``layers/<name>`` (N, T, C), ``text_embeds`` (N, K, D)) from the betas
``X`` (n, V), choosing the ridge penalty by grouped K-fold cross-validation.

Usage (what the ``fit-adapters --method ridge`` stage does)::

    from pipeline.adapters.ridge import RidgeAdapter

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
- ``backend``: ``"auto"`` (CUDA via torch when present, else torch on CPU), ``"torch"``,
  ``"torch_cuda"`` or ``"numpy"``; ``dtype`` is the compute precision.
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
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ...errors import UserError
from ...store import compressor

ALPHA_PER = ("target", "token", "array")
CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1
FLOAT_DTYPES = ("float32", "float64")
COEF_DTYPES = ("float32", "float16")
PREDICT_TENSORS = ("coef", "intercept", "y_mean", "y_std")  # per target, read block by block to predict


# ---------------------------------------------------------------------------------------------
# Backends: the only place that knows about devices.


@dataclass(frozen=True)
class Backend:
    """The few array operations the solvers need beyond ``@``, ``.T``, indexing and arithmetic."""

    name: str
    asarray: Callable[[np.ndarray, str | None], Any]  # host array -> backend array (dtype or keep)
    to_numpy: Callable[[Any], np.ndarray]
    eigh: Callable[[Any], tuple[Any, Any]]  # symmetric eigendecomposition: values, vectors
    stack: Callable[[list[Any]], Any]


def _numpy_backend() -> Backend:
    return Backend(
        name="numpy",
        asarray=lambda a, dtype: np.asarray(a, dtype=dtype),
        to_numpy=np.asarray,
        eigh=np.linalg.eigh,
        stack=np.stack,
    )


def _torch_backend(device: str) -> Callable[[], Backend]:
    def make() -> Backend:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("ridge backend 'torch_cuda': no CUDA device is visible (use 'torch' or 'auto')")

        def asarray(a: np.ndarray, dtype: str | None) -> Any:
            t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
            return t if dtype is None else t.to(getattr(torch, dtype))

        return Backend(
            name="torch" if device == "cpu" else "torch_cuda",
            asarray=asarray,
            to_numpy=lambda t: t.cpu().numpy(),
            eigh=torch.linalg.eigh,
            stack=torch.stack,
        )

    return make


BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy_backend,
    "torch": _torch_backend("cpu"),
    "torch_cuda": _torch_backend("cuda"),
}


def get_backend(name: str = "auto") -> Backend:
    """A backend by name; ``"auto"`` is CUDA through torch when present, else torch on CPU."""
    if name == "auto":
        import torch

        name = "torch_cuda" if torch.cuda.is_available() else "torch"
    if name not in BACKENDS:
        raise UserError(f"ridge backend: {name!r} is not one of auto, {', '.join(BACKENDS)}")
    return BACKENDS[name]()


# ---------------------------------------------------------------------------------------------
# Folds and pure solver functions (backend arrays in, backend arrays out).


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


# ---------------------------------------------------------------------------------------------
# Reading targets in column blocks.


@dataclass(frozen=True)
class TargetLayout:
    """How a target array (N, *shape) is flattened and cut into blocks along axis 1."""

    shape: tuple[int, ...]  # per-row shape, e.g. (T, C) or (D,)
    step: int  # entries of axis 1 per block

    @property
    def unit(self) -> int:
        """Columns per entry of axis 1 (C for (T, C), 1 for (D,))."""
        return math.prod(self.shape[1:])

    @property
    def n_columns(self) -> int:
        return math.prod(self.shape)

    def blocks(self) -> Iterator[tuple[slice, slice]]:
        """(axis-1 slice, flattened-column slice) pairs covering the array."""
        for start in range(0, self.shape[0], self.step):
            stop = min(start + self.step, self.shape[0])
            yield slice(start, stop), slice(start * self.unit, stop * self.unit)


def target_layout(shape: Sequence[int], n_targets_batch: int, chunk: int | None = None) -> TargetLayout:
    """Blocks of about ``n_targets_batch`` columns made of whole axis-1 entries (and whole chunks)."""
    shape = tuple(int(d) for d in shape) or (1,)
    step = max(1, n_targets_batch // math.prod(shape[1:]))
    if chunk and chunk < shape[0]:
        step = max(chunk, step // chunk * chunk)
    return TargetLayout(shape, min(step, shape[0]))


def axis1_chunk(array: Any) -> int | None:
    """The chunk length of axis 1 for zarr, h5py or dask arrays (None when not chunked)."""
    chunks = getattr(array, "chunks", None)
    if not isinstance(chunks, tuple) or len(chunks) < 2:
        return None
    chunk = chunks[1]
    return int(chunk[0] if isinstance(chunk, tuple) else chunk)


RowIndex = tuple[Any, Any]
"""Which target rows X uses: (unique rows to read: sorted int array or slice, inverse or None)."""


def read_block(array: Any, rows: RowIndex, axis1: slice) -> np.ndarray:
    """``array[rows, axis1]`` flattened to (n, columns)."""
    index: tuple[Any, ...] = (rows[0],)
    if len(array.shape) > 1:
        index += (axis1,)
    block = np.asarray(array.oindex[index] if hasattr(array, "oindex") else array[index])
    if rows[1] is not None:
        block = block[rows[1]]
    return block.reshape(len(block), -1)


def needs_staging(array: Any, layout: TargetLayout) -> bool:
    """True for a chunked (on-disk or lazy) array whose chunks span axis 1 when the fit needs
    several column blocks: every block would decode every chunk again (the CLIP cache's layout)."""
    chunk = axis1_chunk(array)
    return chunk is not None and chunk >= layout.shape[0] and layout.step < layout.shape[0]


def stage_rows(array: Any, rows: RowIndex, layout: TargetLayout, folder: Path, progress: bool = False) -> zarr.Array:
    """Copy the used rows of ``array`` once, in row slabs, into a Zarr array chunked by column block.

    Reading the source row by row decodes each of its chunks about once; the copy then serves
    every column block without waste. Memory: one slab of about one block's size.
    """
    selected = np.arange(array.shape[0])[rows[0]]
    n, n_columns = len(selected), layout.n_columns
    slab = max(1, n * layout.step * layout.unit // n_columns)
    staged = zarr.create_array(
        store=str(folder),
        shape=(n, *layout.shape),
        chunks=(slab, layout.step, *layout.shape[1:]),
        dtype=array.dtype,
        compressors=compressor(),
    )
    starts = list(range(0, n, slab))
    for start in _progress(starts, progress, "ridge staging targets"):
        part = selected[start : start + slab]
        block = array.oindex[(part,)] if hasattr(array, "oindex") else array[part]
        staged[start : start + len(part)] = np.asarray(block).reshape(len(part), *layout.shape)
    return staged


@contextmanager
def block_reader(
    array: Any, rows: RowIndex, layout: TargetLayout, name: str, scratch: Path, progress: bool = False
) -> Iterator[Callable[[slice], np.ndarray]]:
    """A reader of column blocks of one target, staged first when that saves decoding (see
    :func:`needs_staging`); refuses NaN/inf naming the target. The staged copy is removed after."""
    folder = None
    if needs_staging(array, layout):
        folder = Path(tempfile.mkdtemp(prefix="ridge-staged-", dir=scratch))
        array, rows = stage_rows(array, rows, layout, folder / "y.zarr", progress), (slice(None), rows[1])

    def read(axis1: slice) -> np.ndarray:
        block = read_block(array, rows, axis1)
        if not np.isfinite(block).all():
            raise UserError(
                f"ridge target {name!r}: NaN/inf values in entries {axis1.start}..{axis1.stop - 1} of axis 1"
            )
        return block

    try:
        yield read
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The weights file: a safetensors file written and read by row ranges.

_ST_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64"}


class TensorFile:
    """A safetensors file whose tensors are written and read by row range with ``pwrite``/``pread``.

    The header (names, dtypes, shapes) is fixed up front, so huge tensors never sit in memory;
    the result is a standard safetensors file (``safetensors.safe_open`` reads it).
    """

    def __init__(self, path: Path, header: dict[str, Any], data_start: int):
        self.path, self.header, self.data_start = Path(path), header, data_start

    @classmethod
    def create(cls, path: Path, specs: Mapping[str, tuple[tuple[int, ...], str]]) -> TensorFile:
        header: dict[str, Any] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            size = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            fh.truncate(8 + len(raw) + offset)
        return cls(path, header, 8 + len(raw))

    @classmethod
    def open(cls, path: Path) -> TensorFile:
        try:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        return cls(path, header, 8 + n)

    def _locate(self, name: str, start: int, stop: int) -> tuple[int, int, np.dtype, tuple[int, ...]]:
        entry = self.header[name]
        dtype = np.dtype({v: k for k, v in _ST_DTYPES.items()}[entry["dtype"]])
        row_shape = tuple(entry["shape"][1:])
        row_bytes = math.prod(row_shape) * dtype.itemsize
        return (
            self.data_start + entry["data_offsets"][0] + start * row_bytes,
            (stop - start) * row_bytes,
            dtype,
            row_shape,
        )

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        offset, size, dtype, _ = self._locate(name, start, start + len(values))
        view = memoryview(np.ascontiguousarray(values, dtype=dtype)).cast("B")
        assert view.nbytes == size, (name, view.nbytes, size)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            done = 0
            while done < size:  # one call moves at most ~2 GiB on Linux
                done += os.pwrite(fd, view[done:], offset + done)
        finally:
            os.close(fd)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.header[name]["shape"][0] if stop is None else stop
        offset, size, dtype, row_shape = self._locate(name, start, stop)
        out = np.empty((stop - start, *row_shape), dtype)
        view = memoryview(out).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < size:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    raise UserError(f"{self.path}: truncated safetensors file (tensor {name!r})")
                done += got
        finally:
            os.close(fd)
        return out


# ---------------------------------------------------------------------------------------------
# The estimator.


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
    ):
        self.alphas = [float(a) for a in alphas]
        self.cv = cv
        self.alpha_per = alpha_per
        self.fit_intercept = fit_intercept
        self.rescale = rescale
        self.n_targets_batch = int(n_targets_batch)
        self.backend = backend
        self.dtype = dtype
        self.coef_dtype = coef_dtype
        self.seed = seed
        self.progress = progress
        self.path_: Path | None = None
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

        solver = _Solver.build(get_backend(self.backend), X, splits, grid, self.fit_intercept, self.dtype)
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
        for axis1, cols in _progress(blocks, self.progress, f"ridge CV {name}"):
            Y = xp.asarray(read(axis1), self.dtype)
            scores[:, cols] = solver.scores(Y)
            if local:
                self._write_block(solver, weights, name, cols, Y, select_alphas(scores[:, cols], grid, group), scores)
        if not local:
            best = select_alphas(scores, grid, group)
            for axis1, cols in _progress(blocks, self.progress, f"ridge refit {name}"):
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
        xp = get_backend(self.backend)
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
    def load(cls, path: Path, backend: str | None = None) -> RidgeAdapter:
        """Reload a saved adapter; ``backend`` overrides the one it was fitted with."""
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise UserError(f"{path}: not a complete ridge adapter (expected {CONFIG} and {WEIGHTS})")
        try:
            config = json.loads((path / CONFIG).read_text())
        except ValueError as exc:
            raise UserError(f"{path / CONFIG}: not valid JSON ({exc})") from None
        if config.get("method") != "ridge" or config.get("format") != FORMAT:
            raise UserError(f"{path / CONFIG}: not a ridge adapter of format {FORMAT}")
        params = dict(config["params"], **({} if backend is None else {"backend": backend}))
        adapter = cls(**params)
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
            "targets": self.targets_,
            "weights": WEIGHTS,
        }
        tmp = out / f"{CONFIG}.tmp"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, out / CONFIG)

    def _check_fitted(self) -> None:
        if self.path_ is None:
            raise UserError("ridge adapter: not fitted (call fit or load first)")


def _progress(items: list, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="block")
