"""Stage-2 row reads at the CLIP cache's real layout: scattered vs consecutive rows, and the old reader.

    python benchmarks/reads.py                      # 73,000 x 257 x 16 float16, 9,000 rows: ~2 min on 2 cores
    python benchmarks/reads.py --rows 4096 --wanted 500 --baseline-rows 4   # seconds

A Zarr array with extract-clip's layout for a ViT-L/14 all-token layer (one row per chunk, shards of
``--shard-rows`` rows, :func:`pipeline.store.compressor`; random float16 values) is written to a work
folder, with ``--channels`` instead of 1,024 so that it fits disk and minutes (every row exists on
disk). Then, through :func:`pipeline.store.take_rows`:

- ``scattered``: ``--wanted`` sorted random distinct rows (one NSD subject's training images);
- ``consecutive``: the same number of consecutive rows (the fastest a reader can go);
- ``old_reader``: the reader before issue 21, kept here only as the baseline (its slices of up to
  64 MB ran to the end of the array, not of the run), on ``--baseline-rows`` of the scattered rows
  (it takes seconds per row), against the current reader on the same rows.

Each reports rows/s, ``read_amplification`` (bytes of chunks decoded / bytes of the rows returned,
counted by :class:`pipeline.store.ReadStats`) and ``storage_mb_read`` (bytes the store handed out,
counted by a wrapper around it: an independent check of the amplification). The current reader is
timed on a plain local store (as stage 2 opens it: it then reads shard files with ``os.pread``) and
its storage bytes are counted in a second, untimed pass through the wrapper. The old reader's
amplification at the real 257 x 1,024 row width is also counted from its slices (no data needed).
Targets (issue 21): amplification <= 1.1, scattered rows/s within 2x of consecutive. The store was
just written, so reads come from the page cache for every variant alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from report import emit  # noqa: E402  (benchmarks/ is the script's folder)
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.store import ReadStats, compressor, take_rows  # noqa: E402

OLD_SLAB_BYTES = 64 << 20
REAL_ROW = (257, 1024)
"""A ViT-L/14 all-token layer row: the width the old reader's amplification is counted at."""


class CountingStore(WrapperStore):
    """A store that adds the size of every value it hands out to ``counter[0]``."""

    def __init__(self, store: Any, counter: list[int] | None = None) -> None:
        super().__init__(store)
        self.counter = [0] if counter is None else counter

    def _with_store(self, store: Any) -> CountingStore:
        return type(self)(store, self.counter)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is not None:
            self.counter[0] += len(value)
        return value


# ---- the baseline: the reader before issue 21 ------------------------------------------------------------
def old_slices(rows: np.ndarray, n: int, chunk_rows: int, row_bytes: int) -> Iterator[tuple[int, int, slice]]:
    """(lo, hi, rows' positions) of each slice the old reader asked for: runs of consecutive touched
    chunks cut every 64 MB, each slice bounded by the end of the array only."""
    window = max(1, OLD_SLAB_BYTES // (chunk_rows * row_bytes))
    chunk = rows // chunk_rows
    starts = np.flatnonzero(np.r_[True, np.diff(chunk) > 1])
    for a, b in zip(starts, np.r_[starts[1:], len(rows)]):
        for c0 in range(int(chunk[a]), int(chunk[b - 1]) + 1, window):
            lo, hi = c0 * chunk_rows, min((c0 + window) * chunk_rows, n)
            yield lo, hi, slice(int(np.searchsorted(rows, lo)), int(np.searchsorted(rows, hi)))


def old_take_rows(array: zarr.Array, rows: np.ndarray, stats: ReadStats) -> np.ndarray:
    """Sorted distinct ``rows`` as the old reader read them (baseline only)."""
    row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
    per_chunk = int(array.chunks[0])
    out = np.empty((len(rows), *array.shape[1:]), array.dtype)
    stats.add(0, len(rows) * row_bytes)
    for lo, hi, sel in old_slices(rows, array.shape[0], per_chunk, row_bytes):
        out[sel] = array[lo:hi][rows[sel] - lo]
        stats.add(-(-(hi - lo) // per_chunk) * per_chunk * row_bytes)
    return out


def old_amplification(rows: np.ndarray, n: int, row: tuple[int, ...]) -> float:
    """The old reader's decoded / needed bytes for ``rows`` at 1-row chunks of float16 ``row``, counted
    from its slices."""
    row_bytes = int(np.prod(row)) * 2
    decoded = sum(hi - lo for lo, hi, _ in old_slices(rows, n, 1, row_bytes))
    return decoded / len(rows)


# ---- the store and the timings ---------------------------------------------------------------------------
def write_store(path: Path, rows: int, tokens: int, channels: int, shard_rows: int, seed: int) -> float:
    """extract-clip's layout (see pipeline/features/cache.py: 1-row chunks, whole-shard writes); seconds."""
    t0 = time.perf_counter()
    z = zarr.create_array(LocalStore(path), shape=(rows, tokens, channels), dtype="float16", fill_value=0,
                          chunks=(1, tokens, channels), shards=(shard_rows, tokens, channels),
                          compressors=[compressor()], zarr_format=3)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, shard_rows):
        stop = min(start + shard_rows, rows)
        z[start:stop] = rng.standard_normal((stop - start, tokens, channels), np.float32).astype(np.float16)
    return time.perf_counter() - t0


def timed(read, array: zarr.Array, ids: np.ndarray, counted: zarr.Array, counter: list[int]
          ) -> tuple[np.ndarray, dict[str, Any]]:
    """``read`` of ``ids`` timed on ``array``; storage bytes counted through ``counted`` (the same
    array behind :class:`CountingStore`; read again unless it is ``array``)."""
    stats, before = ReadStats(), counter[0]
    t0 = time.perf_counter()
    block = read(array, ids, stats)
    seconds = time.perf_counter() - t0
    if counted is not array:
        read(counted, ids, ReadStats())
    return block, {"rows": len(ids), "seconds": round(seconds, 3), "rows_per_s": round(len(ids) / seconds, 1),
                   "read_amplification": round(stats.amplification, 3),
                   "storage_mb_read": round((counter[0] - before) / 1e6, 2)}


def run(rows: int = 73000, wanted: int = 9000, tokens: int = 257, channels: int = 16, shard_rows: int = 1024,
        seed: int = 0, folder: str | None = None, *, baseline_rows: int = 16) -> dict:
    """Write the store (in ``folder``, or a temporary one, removed after), time the reads, return the figures."""
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="reads-", dir=folder))
    try:
        path = work / "layer.zarr"
        write_seconds = write_store(path, rows, tokens, channels, shard_rows, seed)
        counter = [0]
        counted = zarr.open_array(CountingStore(LocalStore(path, read_only=True), counter), mode="r")
        array = zarr.open_array(LocalStore(path, read_only=True), mode="r")
        rng = np.random.default_rng(seed + 1)
        scattered = np.sort(rng.choice(rows, wanted, replace=False))
        start = int(rng.integers(0, rows - wanted + 1))
        consecutive = np.arange(start, start + wanted)
        block, fast = timed(take_rows, array, consecutive, counted, counter)
        block, spread = timed(take_rows, array, scattered, counted, counter)
        subset = np.sort(rng.choice(scattered, min(baseline_rows, wanted), replace=False))
        old, old_run = timed(old_take_rows, counted, subset, counted, counter)
        new, new_run = timed(take_rows, array, subset, counted, counter)
        if not np.array_equal(old, new) or not np.array_equal(block[np.searchsorted(scattered, subset)], new):
            raise AssertionError("the readers disagree")
        return {
            "layout": {"shape": [rows, tokens, channels], "dtype": "float16", "chunk_rows": 1, "shard_rows": shard_rows,
                       "compressor": "blosc zstd 3, shuffle", "stored_mb": round(_size(path) / 1e6, 1),
                       "write_seconds": round(write_seconds, 1)},
            "scattered": spread, "consecutive": fast,
            "scattered_vs_consecutive_slowdown": round(fast["rows_per_s"] / spread["rows_per_s"], 2),
            "old_reader": {"baseline": old_run, "current_same_rows": new_run,
                           "speedup": round(old_run["seconds"] / max(new_run["seconds"], 1e-9), 1),
                           f"amplification_{wanted}_rows_at_{REAL_ROW[0]}x{REAL_ROW[1]}_counted":
                               round(old_amplification(scattered, rows, REAL_ROW), 1)},
            "targets": {"read_amplification_max": 1.1, "slowdown_max": 2.0},
            "cpus": os.cpu_count(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=73000)
    p.add_argument("--wanted", type=int, default=9000)
    p.add_argument("--tokens", type=int, default=257)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--shard-rows", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folder", default=None, help="where to write the store (default: the temporary folder)")
    p.add_argument("--baseline-rows", type=int, default=16, help="scattered rows the old reader is timed on")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    emit(run(a.rows, a.wanted, a.tokens, a.channels, a.shard_rows, a.seed, a.folder, baseline_rows=a.baseline_rows),
         a.out)


if __name__ == "__main__":
    main()
