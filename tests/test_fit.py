"""fit-adapters, decode and evaluate end to end on the demo: planted hierarchy, reload, bad input."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline.decoding.run import decode_run
from pipeline.errors import UserError
from pipeline.evaluation.runs import evaluate_run
from pipeline.features.cache import DONE
from pipeline.features.extract import extract_clip
from pipeline.fitting.adapters.ridge import RidgeAdapter
from pipeline.fitting.fit import fit_adapters

ROOT = Path(__file__).resolve().parents[1]
FLOC = "floc-faces,floc-bodies,floc-places,floc-words".split(",")
RIDGE = {"alphas": [1.0, 10.0, 100.0, 1000.0, 10000.0], "cv": 3}


@pytest.fixture(scope="module")
def stores(demo_fmri, demo_clip) -> tuple[Path, Path]:
    return demo_fmri(), demo_clip()


def _fit(stores, out, **kw) -> dict:
    return fit_adapters(*stores, "ridge", out, params=RIDGE, progress=False, **kw)


def test_hierarchy_low_level_voxels_predict_the_intermediate_target(stores, tmp_path):
    targets = ["layers/2-4_mean", "image_embeds"]
    low = _fit(stores, tmp_path / "low", targets=targets, rois=["prf-visualrois"])["targets"]
    high = _fit(stores, tmp_path / "high", targets=targets, rois=FLOC)["targets"]
    assert low["layers/2-4_mean"]["pearson_r"] > high["layers/2-4_mean"]["pearson_r"]
    assert high["image_embeds"]["pearson_r"] > low["image_embeds"]["pearson_r"]


def test_run_folder_reloads_and_reproduces_predictions(stores, tmp_path):
    report = _fit(stores, tmp_path / "run", targets=["image_embeds"])
    assert report["targets"]["image_embeds"]["top1_retrieval"] > 10 * report["targets"]["image_embeds"]["top1_chance"]
    preds = zarr.open_group(tmp_path / "run/predictions.zarr", mode="r")
    fmri = zarr.open_group(stores[0], mode="r")
    np.testing.assert_array_equal(preds["test/image_ids"][:], fmri["test/image_ids"][:])
    again = RidgeAdapter.load(tmp_path / "run/adapters/ridge").predict(fmri["test/betas"][:])
    np.testing.assert_array_equal(again["image_embeds"], preds["test/image_embeds"][:])
    assert json.loads((tmp_path / "run/run.json").read_text())["alphas"]["image_embeds"]["median"] in RIDGE["alphas"]
    assert not list(tmp_path.glob("run.tmp-*"))


def test_decode_retrieval_and_evaluate(stores, demo_root, tmp_path):
    _fit(stores, tmp_path / "run", targets=["image_embeds"])
    folder = decode_run(tmp_path / "run", demo_root)
    test_ids = zarr.open_group(stores[0], mode="r")["test/image_ids"][:]
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in sorted(test_ids)]
    assert (tmp_path / "run/recon_grid.png").is_file()
    out = evaluate_run(tmp_path / "run", demo_root)
    assert 0 < out["reconstruction"]["SSIM"] <= 1 and "AlexNet(2)" in out["unavailable"]
    assert json.loads((tmp_path / "run/metrics.json").read_text())["method"] == "ridge"
    zero = out["brainclip"]["zero_shot"]
    assert zero["n_scored"] == len(test_ids) and 0 <= zero["top1"] <= zero["top5"] <= 1
    assert out["retrieval"]["space"] == "image_embeds" and out["retrieval"]["comparable_to"].startswith("none: MindEye1")


def test_bad_inputs(stores, tmp_path):
    fmri, clip = stores
    with pytest.raises(UserError, match="no target layers/99"):
        _fit(stores, tmp_path / "a", targets=["layers/99"])
    with pytest.raises(UserError, match="holds subject 1, not subject 2"):
        _fit(stores, tmp_path / "b", subject=2)
    nan = tmp_path / "nan.zarr"
    shutil.copytree(fmri, nan)
    g = zarr.open_group(nan, mode="r+")
    betas = g["train/betas"][:]
    betas[0, 3] = np.nan
    g["train/betas"][:] = betas
    with pytest.raises(UserError, match="NaN/inf in 1 voxels"):
        fit_adapters(nan, clip, "ridge", tmp_path / "c", params=RIDGE, progress=False)
    g["train/betas"][:] = np.nan_to_num(betas)
    ids = g["train/image_ids"][:]
    g["train/image_ids"][:] = ids + 10_000
    with pytest.raises(UserError, match="image ids reach"):
        fit_adapters(nan, clip, "ridge", tmp_path / "d", params=RIDGE, progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_cli_errors_are_one_line(stores, tmp_path):
    result = CliRunner().invoke(app, ["decode", "--run", str(tmp_path / "none"), "--nsd-root", str(tmp_path)])
    assert result.exit_code == 1 and result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["fit-adapters", "--fmri", str(stores[0]), "--clip", str(stores[1]), "--method", "svm"])
    assert result.exit_code == 1 and "--method must be one of" in result.output


def test_heldout_categories_and_labelled_retrieval_space(stores, demo_root, tmp_path):
    import pandas as pd

    held = ["circle", "ring"]
    _fit(stores, tmp_path / "run", targets=["image_embeds", "layers/6"], holdout_categories=held, nsd_root=demo_root)
    info = json.loads((tmp_path / "run/run.json").read_text())
    # which images show a held-out category, read straight from the stim-info table and COCO files
    stim = pd.read_csv(demo_root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv", index_col=0)
    shows = set()
    for split in stim["cocoSplit"].unique():
        doc = json.loads((demo_root / f"nsddata_stimuli/stimuli/nsd/annotations/instances_{split}.json").read_text())
        cats = {c["id"] for c in doc["categories"] if c["name"] in held}
        coco = {a["image_id"] for a in doc["annotations"] if a["category_id"] in cats}
        shows |= set(stim.index[(stim["cocoSplit"] == split) & stim["cocoId"].isin(coco)])
    fmri = zarr.open_group(stores[0], mode="r")
    train_ids, test_ids = fmri["train/image_ids"][:], fmri["test/image_ids"][:]
    assert info["holdout_categories"] == held
    assert info["heldout_train_trials"] == sum(int(i) in shows for i in train_ids) > 0
    decode_run(tmp_path / "run", demo_root)
    out = evaluate_run(tmp_path / "run", demo_root, retrieval_target="layers/6")
    assert out["retrieval"]["space"] == "layers/6" and out["retrieval"]["row_shape"] == [17, 64]
    assert out["retrieval"]["comparable_to"].startswith("none") and 0 <= out["retrieval"]["brain_to_image"] <= 1
    assert "retrieval_brain_to_image" not in out["reconstruction"]
    heldout = out["brainclip"]["zero_shot_heldout"]
    assert heldout["categories"] == held and heldout["n_scored"] == sum(int(i) in shows for i in test_ids)
    assert "BrainCLIP" in heldout["protocol"] and "except the held-out" in out["brainclip"]["zero_shot"]["protocol"]
    with pytest.raises(UserError, match="no category 'unicorn'"):
        _fit(stores, tmp_path / "bad", holdout_categories=["unicorn"], nsd_root=demo_root)


# ---- partial CLIP caches ---------------------------------------------------------------------------
def test_partial_cache_is_refused_with_the_command_that_fills_it(stores, demo_root, tmp_path):
    fmri = stores[0]
    partial = extract_clip(demo_root, tmp_path / "partial.zarr", model="nsd-tiny-vit", layers="2-4:mean,6",
                           pretrained=str(demo_root / "demo/nsd-tiny-vit.safetensors"), images="0-63",
                           shard_rows=64, progress=False)
    with pytest.raises(UserError, match="are not extracted yet") as err:
        fit_adapters(fmri, partial, "ridge", tmp_path / "run", params=RIDGE, progress=False)
    assert not list(tmp_path.glob("run*"))
    message = str(err.value)
    g = zarr.open_group(fmri, mode="r")
    ids = np.concatenate([g["train/image_ids"][:], g["test/image_ids"][:]])
    missing = set((ids // 64).tolist()) - {0}
    ranges = re.search(r"images (.*) are not extracted", message)[1].split(", ")
    named = {s for r in ranges for s in range(int(r.split("-")[0]) // 64, int(r.split("-")[1]) // 64 + 1)}
    assert named == missing and f"({len(set(ids[ids >= 64]))} of the {len(set(ids))} images" in message
    command = shlex.split(message.split("fill them with: ")[1])
    assert command[:3] == ["python", "cli.py", "extract-clip"] and "--images" in command
    result = CliRunner().invoke(app, command[2:])
    assert result.exit_code == 0, result.output
    assert _fit((fmri, partial), tmp_path / "run", targets=["image_embeds"])["n_test"] > 0


def test_decode_and_evaluate_refuse_test_images_of_unfinished_shards(stores, demo_root, tmp_path):
    clip = tmp_path / "clip.zarr"
    shutil.copytree(stores[1], clip)
    _fit((stores[0], clip), tmp_path / "run", targets=["image_embeds"])
    decode_run(tmp_path / "run", demo_root)
    zarr.open_array(clip / DONE, mode="r+")[0] = False  # as if the shard had never finished
    for step in (decode_run, evaluate_run):
        last = zarr.open_group(clip, mode="r")["image_embeds"].shape[0] - 1
        with pytest.raises(UserError, match=rf"images 0-{last} are not extracted yet .*extract-clip .*--images 0-{last}"):
            step(tmp_path / "run", demo_root)
    assert not (tmp_path / "run/metrics.json").exists()


# ---- repeats: train on trials, test on images --------------------------------------------------------
def test_trial_stores_give_one_prediction_and_reconstruction_per_test_image(stores, demo_root, demo_fmri, tmp_path,
                                                                           monkeypatch):
    import pipeline.fitting.adapters.ridge as ridge_module

    trials = demo_fmri(repeats="trials")
    g = zarr.open_group(trials, mode="r")
    real, folds = ridge_module.grouped_folds, []

    def spy(*args, **kwargs):
        folds.extend(real(*args, **kwargs))
        return folds

    monkeypatch.setattr(ridge_module, "grouped_folds", spy)
    report = fit_adapters(trials, stores[1], "ridge", tmp_path / "run", params=RIDGE, targets=["image_embeds"],
                          progress=False)
    train_ids = g["train/image_ids"][:]
    assert len(folds) == RIDGE["cv"] and len(train_ids) > len(set(train_ids))
    assert all(not set(train_ids[a]) & set(train_ids[b]) for a, b in folds)  # repeats never straddle folds

    test_ids = g["test/image_ids"][:]
    images, counts = np.unique(test_ids, return_counts=True)
    preds = zarr.open_group(tmp_path / "run/predictions.zarr", mode="r")
    np.testing.assert_array_equal(preds["test/image_ids"][:], images)
    np.testing.assert_array_equal(preds["test/n_repeats"][:], counts)
    per_trial = RidgeAdapter.load(tmp_path / "run/adapters/ridge").predict(g["test/betas"][:])["image_embeds"]
    expected = np.stack([per_trial[test_ids == i].mean(0) for i in images])
    np.testing.assert_allclose(preds["test/image_embeds"][:], expected, rtol=1e-5, atol=1e-6)
    assert report["n_test"] == len(images) and report["n_test_rows"] == len(test_ids) > len(images)

    folder = decode_run(tmp_path / "run", demo_root)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in images]
    out = evaluate_run(tmp_path / "run", demo_root)
    assert out["retrieval_pool"] == out["reconstruction"]["n_images"] == len(images)


# ---- kill -9 and resume ----------------------------------------------------------------------------
MCLIP = {"width": 64, "depth": 1, "token_rank": 8}
MCLIP_TRAIN = {"epochs": 12, "batch_size": 16, "lr": 3e-3, "patience": None}
FIT_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pipeline.fitting.fit import fit_adapters
fit_adapters(sys.argv[1], sys.argv[2], "mclip", sys.argv[3], targets=["layers/2-4_mean", "image_embeds"],
             params={params}, train={train}, progress=False)
"""


def _fit_mclip(fmri, clip, out, **train) -> dict:
    return fit_adapters(fmri, clip, "mclip", out, targets=["layers/2-4_mean", "image_embeds"], params=MCLIP,
                        train={**MCLIP_TRAIN, **train}, progress=False)


def test_kill_9_during_mclip_fit_and_rerun_match_an_uninterrupted_fit(stores, demo_fmri, tmp_path):
    from safetensors.numpy import load_file

    fmri = demo_fmri(repeats="train-trials")
    _fit_mclip(fmri, stores[1], tmp_path / "straight")  # in this process, one torch thread (conftest)

    run = tmp_path / "run"
    script = FIT_SCRIPT.format(params=MCLIP, train=MCLIP_TRAIN)
    command = [sys.executable, "-c", script, str(fmri), str(stores[1]), str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env)
    checkpoint = tmp_path / "run.checkpoints/last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the fit ended before it could be killed"
    assert not run.exists() and list(tmp_path.glob("run.tmp-*"))  # the half-built run folder stays behind

    subprocess.run(command, cwd=ROOT, env=env, check=True)
    info = json.loads((run / "run.json").read_text())
    assert 1 <= info["resumed_from"] < MCLIP_TRAIN["epochs"] == info["epochs_run"]
    assert not list(tmp_path.glob("run.tmp-*")) and not checkpoint.parent.exists()
    a, b = (load_file(str(tmp_path / r / "adapters/mclip/adapter.safetensors")) for r in ("straight", "run"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    pa, pb = (zarr.open_group(tmp_path / r / "predictions.zarr", mode="r") for r in ("straight", "run"))
    for key in ("test/image_ids", "test/layers/2-4_mean", "test/image_embeds"):
        np.testing.assert_array_equal(pa[key][:], pb[key][:])


def test_resume_against_other_data_is_refused(stores, demo_fmri, tmp_path, monkeypatch):
    import pipeline.fitting.train as train_module

    fmri, other = demo_fmri(repeats="train-trials"), demo_fmri(repeats="train-trials", zscore="none")
    real, calls = train_module.evaluate_loss, []

    def interrupt_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_loss", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _fit_mclip(fmri, stores[1], tmp_path / "run", epochs=3)
    monkeypatch.setattr(train_module, "evaluate_loss", real)
    assert (tmp_path / "run.checkpoints/last.pt").exists() and not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=r"other settings or data \(data\.betas differ\)"):
        _fit_mclip(other, stores[1], tmp_path / "run", epochs=3)
    assert _fit_mclip(fmri, stores[1], tmp_path / "run", epochs=3)["n_test"] > 0  # the same data resumes


def test_timings_report_measured_read_amplification_and_a_torn_cache_is_one_line(stores, tmp_path):
    fmri, clip = stores
    _fit_mclip(fmri, clip, tmp_path / "run", epochs=1)
    reads = json.loads((tmp_path / "run" / "timings.json").read_text())["target_reads"]
    assert reads["decoded_bytes"] >= reads["needed_bytes"] > 0
    assert reads["read_amplification"] == pytest.approx(reads["decoded_bytes"] / reads["needed_bytes"], rel=1e-3)

    torn = tmp_path / "torn.zarr"
    shutil.copytree(clip, torn)
    shard = sorted(p for p in (torn / "layers" / "2-4_mean" / "c").rglob("*") if p.is_file())[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = CliRunner().invoke(app, ["fit-adapters", "--fmri", str(fmri), "--clip", str(torn), "--method", "mclip",
                                      "--targets", "layers/2-4_mean,image_embeds", "--epochs", "1",
                                      "--out", str(tmp_path / "torn_run")])
    errors = [line for line in result.output.splitlines() if "error" in line]  # after the loading bar, if any
    assert result.exit_code == 1 and len(errors) == 1 and errors[0].startswith("error:"), result.output
    assert "torn.zarr/layers/2-4_mean" in errors[0] and "damaged" in errors[0]
    assert not list(tmp_path.glob("torn_run*"))
