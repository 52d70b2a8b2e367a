"""Atomic outputs: a replaced folder or file is never missing, and killed writers' leftovers are tidied."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from zarr.codecs import BytesCodec, ZstdCodec
from zarr.storage import LocalStore, WrapperStore

from pipeline import store
from pipeline.features.cache import ArraySpec, create_store


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _complete(path: Path, text: str) -> bool:
    return (path / "data.txt").is_file() and (path / "data.txt").read_text() == text


def test_replacing_a_folder_never_leaves_neither(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "data.txt").write_text("old")
    seen = []
    real = os.replace

    def watched(src, dst):  # before and after every rename: the old or the new run is complete somewhere
        for moment in ("before", "after"):
            if moment == "after":
                real(src, dst)
            olds = [p for p in tmp_path.iterdir() if _complete(p, "old")]
            news = [p for p in tmp_path.iterdir() if _complete(p, "new")]
            seen.append((moment, bool(olds), bool(news)))
            assert olds or news

    monkeypatch.setattr(store.os, "replace", watched)
    with store.atomic_dir(out) as tmp:
        assert tmp.name == f"run.tmp-{os.getpid()}" and not _complete(out, "new")
        (tmp / "data.txt").write_text("new")
    assert _complete(out, "new") and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert len(seen) == 4  # two renames: old aside, new in


def test_a_kill_between_the_renames_restores_the_old_folder(tmp_path, dead_pid):
    out = tmp_path / "run"
    aside = tmp_path / f"run.old-{dead_pid}"
    aside.mkdir()
    (aside / "data.txt").write_text("old")
    (tmp_path / f"run.tmp-{dead_pid}").mkdir()  # the new one, unfinished
    lines = store.clean_stale(out)
    assert _complete(out, "old") and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert len(lines) == 2 and any("restored" in line for line in lines)


def test_stale_leftovers_of_dead_processes_go_live_ones_stay(tmp_path, dead_pid):
    out = tmp_path / "subj01.zarr"
    with store.atomic_store(out) as root:
        root.attrs["v"] = 1
    (tmp_path / f"subj01.zarr.tmp-{dead_pid}").mkdir()
    (tmp_path / f"subj01.zarr.old-{dead_pid}").mkdir()  # the new one landed: the old one is garbage
    live = tmp_path / f"subj01.zarr.tmp-{os.getppid()}"
    live.mkdir()
    other = tmp_path / "subj01.zarr.checkpoints"
    other.mkdir()
    with store.atomic_store(out) as root:
        root.attrs["v"] = 2
    assert zarr.open_group(out, mode="r").attrs["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other.name])


def test_failed_writes_leave_the_previous_output(tmp_path):
    out = tmp_path / "metrics.json"
    store.write_text(out, "old")
    with pytest.raises(RuntimeError), store.atomic_file(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    folder = tmp_path / "recon"
    with store.atomic_dir(folder) as tmp:
        (tmp / "data.txt").write_text("old")
    with pytest.raises(RuntimeError), store.atomic_dir(folder) as tmp:
        raise RuntimeError("killed")
    assert out.read_text() == "old" and _complete(folder, "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "recon"]


@pytest.mark.parametrize("chunks, shards", [((4, 3), (16, 3)), ((1, 3), (8, 3)), ((5, 3), None)])
def test_take_rows_of_zarr_arrays_in_any_order(tmp_path, chunks, shards):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((103, 3)).astype(np.float32)
    z = zarr.create_array(tmp_path / "a.zarr", shape=data.shape, chunks=chunks, shards=shards, dtype="float32")
    z[:] = data
    for _ in range(8):
        rows = rng.integers(0, 103, rng.integers(0, 30))
        np.testing.assert_array_equal(store.take_rows(z, rows), data[rows])
        unique = np.unique(rows)  # slices cut at any size still read every row once
        np.testing.assert_array_equal(store._zarr_rows(z, unique, slab_bytes=int(rng.integers(1, 200))), data[unique])


# ---- row reads at the real layout ---------------------------------------------------------------------
class LayoutOnly:
    """A zarr array's shape, chunks and shards without data: records the slices asked for."""

    def __init__(self, shape: tuple[int, ...], chunk_rows: int, shard_rows: int | None, dtype: str = "float16"):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.chunks = (chunk_rows, *shape[1:])
        self.shards = None if shard_rows is None else (shard_rows, *shape[1:])
        self.asked: list[tuple[int, int]] = []

    def __getitem__(self, sel: slice) -> np.ndarray:
        self.asked.append((sel.start, sel.stop))
        return np.broadcast_to(np.zeros((), self.dtype), (sel.stop - sel.start, *self.shape[1:]))


class Discard:
    def __setitem__(self, where, value) -> None:
        pass


@pytest.mark.parametrize("wanted", [9000, 1000, 36000])
def test_scattered_rows_of_the_real_cache_layout_decode_only_what_they_need(wanted):
    """73,000 rows of a ViT-L/14 token layer (257 x 1024 float16), one row per chunk, 1,024-row shards
    (extract-clip's layout); the old reader decoded 111x the 9,000 rows (64 MB slices per wanted row)."""
    from pipeline.features.cache import SHARD_ROWS, default_chunk_rows

    row_bytes = 257 * 1024 * 2
    array = LayoutOnly((73000, 257, 1024), default_chunk_rows(row_bytes, SHARD_ROWS), SHARD_ROWS)
    assert array.chunks[0] == 1
    rows = np.sort(np.random.default_rng(0).choice(73000, wanted, replace=False))
    stats = store.ReadStats()
    stats.add(0, len(rows) * row_bytes)
    store._zarr_rows(array, rows, stats, out=Discard())
    decoded = sum(hi - lo for lo, hi in array.asked) * row_bytes  # 1-row chunks: a slice decodes its rows
    assert decoded / stats.needed <= 1.1
    assert stats.decoded == decoded  # what the reader reports is what it asked for
    assert all(lo // SHARD_ROWS == (hi - 1) // SHARD_ROWS for lo, hi in array.asked)  # one shard per slice


def test_sharded_store_reads_match_numpy_and_count_what_blosc_decodes(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((300, 5, 4)).astype(np.float16)
    z = zarr.create_array(tmp_path / "a.zarr", shape=data.shape, dtype="float16", chunks=(2, 5, 4), shards=(32, 5, 4),
                          compressors=[store.compressor()], fill_value=0)
    z[:] = data
    decoded = []
    real = type(store.compressor())._decode_sync

    def counted(self, chunk_bytes, chunk_spec):
        out = real(self, chunk_bytes, chunk_spec)
        decoded.append(len(out))
        return out

    monkeypatch.setattr(type(store.compressor()), "_decode_sync", counted)
    real_direct = store.numcodecs.blosc.decompress  # the direct path (extract-clip's layout) decodes here
    monkeypatch.setattr(store.numcodecs.blosc, "decompress",
                        lambda data: decoded.append(len(out := real_direct(data))) or out)
    z = zarr.open_array(tmp_path / "a.zarr", mode="r")
    for rows in (rng.integers(0, 300, 40), np.arange(290, 300), rng.permutation(300)[:120], np.array([], int)):
        stats, before = store.ReadStats(), len(decoded)
        np.testing.assert_array_equal(store.take_rows(z, rows, stats), data[rows])
        assert stats.decoded == sum(decoded[before:])  # counted = what blosc decoded
        touched = len(np.unique(np.asarray(rows) // 2))
        assert stats.decoded == touched * 2 * 5 * 4 * 2 and stats.needed == len(np.unique(rows)) * 5 * 4 * 2


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8"])
@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_direct_reads_equal_zarrs_own_reads_and_numpy(tmp_path, monkeypatch, dtype, chunk_rows):
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((100, 5, 4)) * 40).astype(dtype)
    data[chunk_rows * 5:chunk_rows * 6] = 0  # one all-fill chunk, not written: its index entry is "empty"
    z = zarr.create_array(tmp_path / "a.zarr", shape=data.shape, dtype=dtype, chunks=(chunk_rows, 5, 4),
                          shards=(8 * chunk_rows, 5, 4), compressors=[store.compressor()], fill_value=0,
                          config={"write_empty_chunks": False},
                          serializer=BytesCodec(endian="big") if dtype == "float32" else "auto")  # stored >f4
    z[:] = data
    index = np.frombuffer((tmp_path / "a.zarr" / "c" / "0" / "0" / "0").read_bytes()[-(16 * 8 + 4):-4], "<u8")
    assert index[10] == 2**64 - 1  # chunk 5's offset: the empty marker
    assert store._direct_dtype(z) is not None
    wrapped = zarr.open_array(WrapperStore(LocalStore(tmp_path / "a.zarr")), mode="r")
    for rows in (rng.integers(0, 100, 30), np.arange(5 * chunk_rows - 2, 7 * chunk_rows + 3), np.arange(100)):
        direct, generic = store.ReadStats(), store.ReadStats()
        got = store.take_rows(z, rows, direct)
        with monkeypatch.context() as m:
            m.setattr(store, "_direct_dtype", lambda array: None)
            want = store.take_rows(z, rows, generic)
        np.testing.assert_array_equal(got, data[rows])  # os.pread of the shard file (a LocalStore)
        np.testing.assert_array_equal(want, data[rows])
        np.testing.assert_array_equal(store.take_rows(wrapped, rows), data[rows])  # the store's ranged gets
        assert direct.summary() == generic.summary()


def test_the_direct_path_is_taken_for_extract_clips_layout_only(tmp_path):
    create_store(tmp_path / "clip.zarr", {"layers/x": ArraySpec((40, 5, 8), "float16", 1, 16)}, {})
    assert store._direct_dtype(zarr.open_group(tmp_path / "clip.zarr", mode="r")["layers/x"]) == np.float16
    others = {"unsharded": dict(chunks=(1, 5, 8), compressors=[store.compressor()]),
              "no compressor": dict(chunks=(1, 5, 8), shards=(16, 5, 8), compressors=None),
              "zstd": dict(chunks=(1, 5, 8), shards=(16, 5, 8), compressors=[ZstdCodec()]),
              "split row": dict(chunks=(1, 5, 4), shards=(16, 5, 8), compressors=[store.compressor()]),
              "zarr v2": dict(chunks=(1, 5, 8), zarr_format=2)}
    for name, kw in others.items():
        assert store._direct_dtype(zarr.create_array(tmp_path / f"{name}.zarr", shape=(40, 5, 8), dtype="float16",
                                                     **kw)) is None, name


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_shard_is_one_clear_error(tmp_path, damage):
    z = zarr.create_array(tmp_path / "clip.zarr", shape=(96, 3, 4), dtype="float16", chunks=(1, 3, 4),
                          shards=(32, 3, 4), compressors=[store.compressor()], fill_value=0)
    z[:] = np.ones(z.shape, np.float16)
    shard = tmp_path / "clip.zarr" / "c" / "1" / "0" / "0"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    z = zarr.open_array(tmp_path / "clip.zarr", mode="r")
    np.testing.assert_array_equal(store.take_rows(z, [0, 70]), np.ones((2, 3, 4)))  # other shards still read
    with pytest.raises(store.UserError, match=r"clip\.zarr.*(missing|damaged)") as err:
        store.take_rows(z, [3, 40, 41, 90])
    assert "\n" not in str(err.value)
