"""torchrun with two gloo processes on the CPU: process 0 decides early stopping for every process.

The GPU run uses NCCL, where a process that stops while another trains on waits in a collective
until the watchdog kills the job; gloo on CPU processes runs the same decisions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EARLY_STOP_SCRIPT = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
import torch.distributed as dist
from pipeline.fitting import train as train_mod
from pipeline.fitting.data import CacheDataset
from pipeline.fitting.models import adapter_targets, build_adapter

rank = int(__import__("os").environ["RANK"])
calls = []

def local_val_loss(*args, **kwargs):
    # process 0's validation keeps improving; process 1's gets worse after the first epoch, so
    # with patience 1 it alone would stop at epoch 2
    calls.append(1)
    epoch = len(calls)
    return {"loss": 1.0 / epoch if rank == 0 else float(epoch)}

train_mod.evaluate_loss = local_val_loss
rng = np.random.default_rng(0)
n = 64
clip = {"layers/x": rng.standard_normal((n, 5, 8)).astype(np.float32),
        "image_embeds": rng.standard_normal((n, 8)).astype(np.float32)}
config = {"detail_target": "layers/x", "text_target": None, "width": 16, "depth": 1, "token_rank": 2}
targets = adapter_targets("mclip", config)
voxels = {f"floc-{k}": (np.arange(40) % 2).astype(np.int16) for k in ("bodies", "faces", "places", "words")}
data = CacheDataset(rng.standard_normal((n, 40)).astype(np.float32), np.arange(n), clip, targets, voxels)
model = build_adapter("mclip", config, data)
result = train_mod.train(model, data, {"epochs": 4, "batch_size": 16, "lr": 1e-3, "patience": 1,
                                       "val_fraction": 0.25, "progress": False, "device": "cpu"})
out = {"epochs_run": result.epochs_run, "stopped_early": result.stopped_early, "best_epoch": result.best_epoch,
       "val": [h["val_loss"] for h in result.history], "in_group": dist.is_initialized()}
Path = __import__("pathlib").Path
(Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(out))
"""


def test_ranks_stop_at_the_epoch_process_0_decides(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(EARLY_STOP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # without the broadcast, process 1 stops at epoch 2 while process 0 waits for it in epoch 3's
    # collectives (gloo's default timeout is 30 min): the timeout turns that hang into a failure
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                    str(script), str(tmp_path)], cwd=ROOT, env=env, check=True, timeout=180)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["epochs_run"] == 4 and not r0["stopped_early"] and r0["best_epoch"] == 4
    assert r0["val"] == [1.0, 0.5, 1 / 3, 0.25]  # process 0's losses, logged by both
