"""Zarr 3 store helpers shared by every cache writer: atomic creation and compression."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def open_existing(path: Path, what: str) -> zarr.Group:
    """Open a store for reading, with a clear error when it is missing or not a Zarr group."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    try:
        return zarr.open_group(path, mode="r")
    except Exception as exc:  # zarr raises several types for a non-store folder
        raise UserError(f"{what} is not a readable Zarr group: {path} ({exc})") from None
