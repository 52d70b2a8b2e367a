"""Ridge I/O in bounded memory: targets read in column blocks, weights written by row ranges.

- :class:`TargetLayout` / :func:`block_reader`: a target (N, ...) is read as blocks of whole entries
  of axis 1; an on-disk array chunked by rows is staged first (:func:`stage_rows`).
- :class:`TensorFile`: a standard safetensors file whose tensors are written and read by row range.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ...errors import UserError
from ...store import compressor, take_rows


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
    for start in progress_items(starts, progress, "ridge staging targets"):
        part = selected[start : start + slab]
        staged[start : start + len(part)] = take_rows(array, part).reshape(len(part), *layout.shape)
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


def progress_items(items: list, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="block")
