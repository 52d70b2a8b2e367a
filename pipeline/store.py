"""Store helpers shared by every writer: atomic Zarr 3 creation, compression, row reads, disk budget."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from .errors import UserError


def compressor() -> BloscCodec:
    """zstd with byte shuffle: fast to decode and good on float16/float32 features."""
    return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)


@contextmanager
def atomic_store(out: Path) -> Iterator[zarr.Group]:
    """Write a fresh Zarr 3 group at a temporary path and rename it onto ``out`` on success.

    A failure (or a kill) leaves at most a ``*.tmp-<pid>`` folder behind, never a store at
    ``out`` that looks complete.
    """
    out = Path(out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        yield group
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A fresh folder at ``out.tmp-<pid>`` to fill, renamed onto ``out`` (replacing it) on success;
    on any failure it is removed, so ``out`` is either the previous result or the complete new one."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def open_existing(path: Path, what: str) -> zarr.Group:
    """Open a store for reading, with a clear error when it is missing or not a Zarr group."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    try:
        return zarr.open_group(path, mode="r")
    except Exception as exc:  # zarr raises several types for a non-store folder
        raise UserError(f"{what} is not a readable Zarr group: {path} ({exc})") from None


def take_rows(array, rows) -> np.ndarray:
    """``array[rows]`` in the order asked, for numpy, zarr or h5py arrays.

    Lazy stores are read once per distinct row, in sorted order (h5py needs that); rows outside
    the array are one clear error.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= array.shape[0]):
        raise UserError(f"image ids must be in 0..{array.shape[0] - 1}, got {rows.min()}..{rows.max()}")
    if isinstance(array, np.ndarray):
        return array[rows]
    unique, inverse = np.unique(rows, return_inverse=True)
    if isinstance(array, zarr.Array):
        block = array.get_orthogonal_selection((unique,))
    else:
        block = np.asarray(array[unique]) if unique.size else np.asarray(array[:0])
    return block[inverse.reshape(rows.shape)]


def human_bytes(n: float) -> str:
    unit = "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            break
        n /= 1000
    return f"{n:.1f} {unit}"


def check_disk(out: Path, need: int) -> int:
    """Fail clearly when ``need`` bytes will not fit on the file system of ``out``; return the free bytes."""
    probe = Path(out).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(
            f"--out {out}: this run writes up to {human_bytes(need)} (uncompressed) but only "
            f"{human_bytes(free)} is free on {probe}; free space, choose another --out, or shrink the "
            "store (--tokens cls|mean|grid:K, fewer --layers, a range aggregate such as 11-20:mean, or --images)"
        )
    return free
