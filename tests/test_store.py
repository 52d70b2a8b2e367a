"""Atomic outputs: a replaced folder or file is never missing, and killed writers' leftovers are tidied."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import store


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
