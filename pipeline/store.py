"""Store helpers shared by every writer: atomic Zarr 3 creation, compression, row reads, disk budget."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
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


class LazyRows:
    """Rows ``ids`` of a source, read only when sliced: ``rows[a:b]`` is ``read(ids[a:b])``.

    Lets a consumer that works in batches (the image metrics) take 1000 full-size images without
    holding them all, e.g. ``LazyRows(lambda ids: take_rows(brick, ids), test_ids)``.
    """

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], ids: Sequence[int] | np.ndarray) -> None:
        self.read, self.ids = read, np.asarray(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError("LazyRows is read in slices: rows[a:b]")
        return self.read(self.ids[rows])


def human_bytes(n: float) -> str:
    unit = "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            break
        n /= 1000
    return f"{n:.1f} {unit}"


def dvc_cache_copy(out: Path) -> Path | None:
    """The DVC cache folder that will receive a copy of ``out`` after the running stage, or None.

    Inside ``dvc repro`` (``DVC_STAGE``/``DVC_ROOT`` set by DVC) an output declared without
    ``cache: false`` is copied into the cache once the stage ends (unless the cache is configured
    to link: ``cache.type`` hardlink or symlink only), so it takes twice its size; the project's large
    outputs are ``cache: false`` for that reason. Outside DVC, or when the stage cannot be read, None.
    """
    stage, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not stage or not root:
        return None
    try:
        from dvc.repo import Repo

        with Repo(root) as repo:
            links = {t.strip() for t in str(repo.config.get("cache", {}).get("type") or "reflink,copy").split(",")}
            target = Path(out).absolute()
            for declared in (o for s in repo.stage.collect(f"{Path(root) / 'dvc.yaml'}:{stage}") for o in s.outs):
                path = Path(declared.fs_path).absolute()
                if declared.use_cache and (target == path or path in target.parents):
                    return None if links <= {"hardlink", "symlink"} else Path(repo.cache.local.path)
    except Exception:  # not a DVC repository we can read: nothing to add
        return None
    return None


def _existing(path: Path) -> Path:
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def check_disk(out: Path, need: int) -> int:
    """Fail clearly when ``need`` bytes will not fit on the file system of ``out``; return the free bytes.

    Under ``dvc repro`` the copy DVC makes of a cached output is budgeted too (:func:`dvc_cache_copy`),
    on the file system of the DVC cache.
    """
    probe = _existing(out)
    free = shutil.disk_usage(probe).free
    cache = dvc_cache_copy(out)
    extra = ""
    if cache is not None:
        cache_probe = _existing(cache)
        if os.stat(cache_probe).st_dev == os.stat(probe).st_dev:
            need *= 2
            extra = " (twice: DVC copies it into its cache afterwards; mark the output `cache: false` in dvc.yaml)"
        elif need > (cache_free := shutil.disk_usage(cache_probe).free):
            raise UserError(
                f"--out {out}: DVC will copy this output ({human_bytes(need)}) into its cache {cache}, which has "
                f"only {human_bytes(cache_free)} free; mark the output `cache: false` in dvc.yaml or free space"
            )
    if need > free:
        raise UserError(
            f"--out {out}: this run writes up to {human_bytes(need)} (uncompressed){extra} but only "
            f"{human_bytes(free)} is free on {probe}; free space, choose another --out, or shrink the "
            "store (--tokens cls|mean|grid:K, fewer --layers, a range aggregate such as 11-20:mean, or --images)"
        )
    return free
