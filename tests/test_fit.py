"""fit-adapters, decode and evaluate end to end on the demo: planted hierarchy, reload, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline.data.fmri import prepare_fmri
from pipeline.decoding.run import decode_run
from pipeline.errors import UserError
from pipeline.evaluation.runs import evaluate_run
from pipeline.features.extract import extract_clip
from pipeline.fitting.adapters.ridge import RidgeAdapter
from pipeline.fitting.fit import fit_adapters

FLOC = "floc-faces,floc-bodies,floc-places,floc-words".split(",")
RIDGE = {"alphas": [1.0, 10.0, 100.0, 1000.0, 10000.0], "cv": 3}


@pytest.fixture(scope="module")
def stores(demo_root, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("fit")
    fmri = prepare_fmri(demo_root, 1, base / "subj01.zarr", progress=False)
    clip = extract_clip(demo_root, base / "clip.zarr", model="nsd-tiny-vit", layers="2-4:mean,6",
                        pretrained=str(demo_root / "demo/nsd-tiny-vit.safetensors"), progress=False)
    return fmri, clip


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
    with pytest.raises(UserError, match="no COCO category 'unicorn'"):
        _fit(stores, tmp_path / "bad", holdout_categories=["unicorn"], nsd_root=demo_root)
