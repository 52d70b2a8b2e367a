"""Host memory: cgroup v2 / v1 limits (fake cgroup folders) cap the training budget; a configured
budget above the cgroup's room is refused in one line; uint8 targets are held as uint8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import pipeline.fitting.data as data_module
from pipeline.errors import UserError
from pipeline.fitting.data import TargetBank
from pipeline.memory import available_memory, cgroup_room

GB = 10**9


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def test_cgroup_v2_limit_of_the_job_above_the_step(tmp_path):
    """SLURM limits the job's cgroup; the process sits in a step below it whose memory.max is "max"."""
    _write(tmp_path, memory_max="max", memory_current=str(50 * GB))  # the root: no limit
    _write(tmp_path / "job_7", memory_max=str(4 * GB), memory_current=str(1 * GB))
    _write(tmp_path / "job_7/step_0", memory_max="max", memory_current=str(1 * GB))
    proc = "0::/job_7/step_0\n"
    assert cgroup_room(tmp_path, proc) == (4 * GB, 3 * GB)
    assert available_memory(tmp_path, proc) == min(3 * GB, psutil.virtual_memory().available)
    assert cgroup_room(tmp_path, "0::/elsewhere\n") is None  # only "max" on the way to the root


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    proc = "12:pids:/x\n4:memory:/docker/abc\n0::/\n"
    _write(tmp_path / "memory", memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes=str(GB))
    assert cgroup_room(tmp_path, proc) is None  # v1 writes "no limit" as ~2**63
    _write(tmp_path / "memory/docker/abc", memory_limit_in_bytes=str(2 * GB), memory_usage_in_bytes=str(GB // 2))
    assert cgroup_room(tmp_path, proc) == (2 * GB, 3 * GB // 2)
    assert cgroup_room(tmp_path / "absent", proc) is None


def test_budget_follows_the_cgroup_and_refuses_more_than_it_leaves(tmp_path, monkeypatch):
    _write(tmp_path, memory_max=str(1000), memory_current=str(200))
    monkeypatch.setattr(data_module, "available_memory", lambda: available_memory(tmp_path, "0::/\n"))
    monkeypatch.setattr(data_module, "cgroup_room", lambda: cgroup_room(tmp_path, "0::/\n"))
    clip = {"image_embeds": np.ones((10, 16), np.float32)}  # 640 bytes: fits psutil's free memory, not half of 800
    bank = TargetBank(clip, ["image_embeds"], np.arange(10))
    assert bank.streamed and not bank.tables
    assert TargetBank(clip, ["image_embeds"], np.arange(10), memory=700).tables  # 700 <= 800 left
    with pytest.raises(UserError, match=r"exceeds the 0\.0 GB left under this process's cgroup memory limit") as err:
        TargetBank(clip, ["image_embeds"], np.arange(10), memory=900)
    assert "\n" not in str(err.value)


def test_uint8_frames_are_held_as_uint8_and_cast_per_batch():
    frames = np.random.default_rng(0).integers(0, 256, (12, 2, 4, 4, 3), dtype=np.uint8)
    bank = TargetBank({"frames": frames}, ["frames"], np.arange(12), memory=frames.nbytes)
    assert bank.tables["frames"].dtype == torch.uint8 and bank.nbytes_in_memory == frames.nbytes
    batch = bank.gather(np.array([5, 0, 11]))["frames"]
    assert batch.dtype == torch.float32
    np.testing.assert_array_equal(batch.numpy(), frames[[5, 0, 11]].astype(np.float32))
