"""One device module: --device resolution, the GPU each dask worker binds, what the copy stream may
record, ridge runs that load wherever they are scored, and a CUDA device asked of a machine without one.

CUDA is faked where the logic needs it (availability, device count, ``set_device``), so these run on
the CPU; the GPU check script runs the real paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.device import resolve_device, worker_gpu
from pipeline.errors import UserError
from pipeline.features import shards
from pipeline.fitting.adapters.ridge import RidgeAdapter


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def four_gpus(monkeypatch) -> list:
    """A machine with 4 CUDA devices, as far as the logic can tell; returns the set_device calls."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_resolve_device_without_cuda(no_cuda):
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match="no CUDA device is available"):
            resolve_device(asked)
    for bad in ("gpu", "tpu", "meta", "cuda:x"):
        with pytest.raises(UserError, match="--device must be auto, cpu, cuda, cuda:K or mps"):
            resolve_device(bad)


def test_resolve_device_with_gpus(four_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(UserError, match="has 4 CUDA device"):
        resolve_device("cuda:4")


@pytest.mark.parametrize(("device", "worker", "n_gpus", "expected"), [
    ("cuda", 0, 4, "cuda:0"),
    ("cuda", 5, 4, "cuda:1"),  # worker k takes GPU k mod count
    ("cuda", 3, 1, "cuda:0"),  # one visible GPU (e.g. CUDA_VISIBLE_DEVICES per worker)
    ("cuda", "tcp://10.0.0.1:4000", 4, "cuda:0"),  # an external cluster's worker name
    ("cuda", None, 4, "cuda:0"),  # not a dask worker
    ("cuda", True, 4, "cuda:0"),
    ("cuda:2", 1, 4, "cuda:2"),  # the user's explicit choice stands
    ("cpu", 1, 4, "cpu"),
])
def test_worker_gpu(device, worker, n_gpus, expected):
    assert worker_gpu(torch.device(device), worker, n_gpus) == torch.device(expected)


def test_dask_worker_binds_its_gpu_before_cuda_work(four_gpus, monkeypatch):
    import distributed

    class Worker:
        name = 6

    monkeypatch.setattr(distributed, "get_worker", lambda: Worker())
    assert shards._worker_device("auto") == "cuda:2"
    assert four_gpus == [torch.device("cuda", 2)]  # the process's current device: its context opens there only
    four_gpus.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert shards._worker_device("auto") == "cpu" and four_gpus == []


def test_only_device_outputs_are_recorded_on_the_copy_stream():
    # meta tensors stand in for CUDA ones; frames are the loader's (pinned) host tensor
    on_device = {"layers/6": torch.empty(2, 3, device="meta"), "image_embeds": torch.empty(2, device="meta")}
    out = {**on_device, "frames": torch.zeros(2, 6, 8, 8, 3, dtype=torch.uint8)}
    recorded = shards.device_outputs(out)
    assert len(recorded) == 2 and all(a is b for a, b in zip(recorded, on_device.values()))
    assert shards.device_outputs({"frames": out["frames"]}) == []


def test_ridge_records_its_device_apart_from_the_solver(no_cuda, tmp_path):
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((40, 12)), rng.standard_normal((40, 5))
    model = RidgeAdapter(alphas=[1.0, 10.0], cv=3, device="cpu").fit(X, {"y": Y}, out=tmp_path / "new")
    config = json.loads((tmp_path / "new/config.json").read_text())
    assert config["params"]["backend"] == "torch" and config["device"] == "cpu"
    expected = model.predict(X[:7])["y"]
    # a run fitted on CUDA before the device was recorded apart: scored here, on a CPU-only machine
    old = tmp_path / "old"
    old.mkdir()
    (old / "weights.safetensors").write_bytes((tmp_path / "new/weights.safetensors").read_bytes())
    config["params"]["backend"] = "torch_cuda"
    del config["device"]
    (old / "config.json").write_text(json.dumps(config))
    loaded = RidgeAdapter.load(old)
    assert loaded.backend == "torch" and loaded.device == "auto"
    np.testing.assert_array_equal(loaded.predict(X[:7])["y"], expected)
    with pytest.raises(UserError, match="no CUDA device"):  # asked for CUDA explicitly: a clear error
        RidgeAdapter(alphas=[1.0], cv=3, backend="torch_cuda").fit(X, {"y": Y})


STAGES = {
    "decode": ["--run", "r", "--nsd-root", "n"],
    "decode-video": ["--semantic", "s", "--perception", "p", "--out", "o"],
    "evaluate": ["--run", "r", "--nsd-root", "n"],
    "evaluate-video": ["--run", "r"],
    "analyze-layers": ["--fmri", "f.zarr", "--clip", "c.zarr", "--out", "o"],
    "fit-adapters": ["--fmri", "f.zarr", "--clip", "c.zarr", "--method", "ridge", "--out", "o"],
    "extract-clip": ["--stimuli", "s.hdf5", "--out", "o.zarr", "--model", "nsd-tiny-vit", "--pretrained", "none"],
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_cuda_asked_of_a_machine_without_one(stage, no_cuda, tmp_path, monkeypatch):
    """One clear line, exit 1, nothing written: the device is checked before any input is read."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [stage, *STAGES[stage], "--device", "cuda"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == ["error: --device cuda: no CUDA device is available on this "
                                                  "machine (use cpu or auto)"]
    assert list(Path(tmp_path).iterdir()) == []
