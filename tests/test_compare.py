"""evaluate's intervals and per-image file, and compare of evaluated runs (on a decoded demo run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.data.fmri import prepare_fmri
from pipeline.data.nsd import NSD
from pipeline.decoding import decode
from pipeline.decoding.run import decode_run
from pipeline.evaluation.compare import compare_runs, holm
from pipeline.evaluation.runs import evaluate_run
from pipeline.features.extract import extract_clip
from pipeline.fitting.fit import fit_adapters


@pytest.fixture(scope="module")
def evaluated(demo_root, tmp_path_factory) -> Path:
    """A decoded and evaluated ridge run (image_embeds) of the demo's subject 1."""
    base = tmp_path_factory.mktemp("comparerun")
    fmri = prepare_fmri(demo_root, 1, base / "subj01.zarr", progress=False)
    clip = extract_clip(demo_root, base / "clip.zarr", model="nsd-tiny-vit", layers="2",
                        pretrained=str(demo_root / "demo/nsd-tiny-vit.safetensors"), progress=False)
    fit_adapters(fmri, clip, "ridge", base / "run", targets=["image_embeds"],
                 params={"alphas": [10.0, 1000.0], "cv": 2}, progress=False)
    decode_run(base / "run", demo_root)
    evaluate_run(base / "run", demo_root)
    return base / "run"


def test_metrics_json_keeps_its_numbers_and_adds_intervals_around_them(evaluated):
    out = json.loads((evaluated / "metrics.json").read_text())
    assert isinstance(out["reconstruction"]["PixCorr"], float)  # dvc metrics show still reads the numbers
    for section, key in [("reconstruction", "PixCorr"), ("reconstruction", "SSIM"), ("retrieval", "image_to_brain"),
                         ("retrieval", "brain_to_image")]:
        lo, hi = out["ci95"][section][key]
        assert lo <= hi
    px = out["reconstruction"]["PixCorr"]
    assert out["ci95"]["reconstruction"]["PixCorr"][0] <= px <= out["ci95"]["reconstruction"]["PixCorr"][1]
    assert out["bootstrap"]["draws"] == 1000 and out["bootstrap"]["n"] == out["reconstruction"]["n_images"]


def test_evaluate_again_writes_identical_intervals_and_per_image_bytes(evaluated, demo_root, tmp_path):
    again = shutil.copytree(evaluated, tmp_path / "again")
    evaluate_run(again, demo_root)
    assert (again / "per_image.npz").read_bytes() == (evaluated / "per_image.npz").read_bytes()
    first, second = (json.loads((p / "metrics.json").read_text())["ci95"] for p in (evaluated, again))
    assert first == second


def test_a_run_against_itself_differs_by_zero_with_p_one(evaluated):
    result = compare_runs([evaluated, evaluated], draws=200, permutations=500)
    rows = result["comparisons"][0]["metrics"]
    assert {"PixCorr", "SSIM", "retrieval_image_to_brain"} <= set(rows)
    for row in rows.values():
        assert row["difference"] == 0 and row["ci95"] == [0.0, 0.0]
        assert row["p"] == 1.0 and row["p_holm"] == 1.0


def test_a_planted_difference_is_separated(evaluated, demo_root, tmp_path):
    better = shutil.copytree(evaluated, tmp_path / "better")
    half = np.load(evaluated / "per_image.npz")["test_ids"][:20]
    with NSD(demo_root).stimuli() as brick:  # the ground truth itself as the reconstruction of 20 images
        truth = decode.take_rows(brick, half)
    decode.write_reconstructions(better / "recon", half, truth[:, None])
    evaluate_run(better, demo_root)
    row = compare_runs([evaluated, better], draws=300, permutations=2000)["comparisons"][0]["metrics"]["SSIM"]
    assert row["difference"] > 0 and row["ci95"][0] > 0 and row["p_holm"] < 0.01


def test_compare_refuses_runs_on_other_test_images(evaluated, tmp_path):
    other = shutil.copytree(evaluated, tmp_path / "other")
    data = dict(np.load(other / "per_image.npz"))
    data["test_ids"] = data["test_ids"][::-1]
    from pipeline.evaluation.intervals import write_per_image

    write_per_image(other / "per_image.npz", data)
    result = CliRunner().invoke(app, ["compare", str(evaluated), str(other)])
    assert result.exit_code == 1 and "differ in their test images" in result.output


def test_compare_cli_prints_a_table_and_writes_json(evaluated, tmp_path):
    result = CliRunner().invoke(app, ["compare", str(evaluated), str(evaluated), "--out", str(tmp_path / "c.json"),
                                      "--draws", "50", "--permutations", "50"])
    assert result.exit_code == 0, result.output
    assert "PixCorr" in result.output and "p_holm" in result.output
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["draws"] == 50


def test_holm_matches_its_definition():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_baselines_sit_beside_the_metrics_with_intervals(evaluated):
    out = json.loads((evaluated / "metrics.json").read_text())["baselines"]
    near, prior = out["nearest_training_image"], out["category_prior"]
    for found in (near, prior):
        lo, hi = found["ci95"]["reconstruction"]["SSIM"]
        assert lo <= found["reconstruction"]["SSIM"] <= hi
    assert prior["retrieval"]["image_to_brain"] == 0.0  # one constant guess: every candidate ties, ties fail
    q = out["train_test_overlap"]["max_cosine_quantiles"]
    assert q["q00"] <= q["q50"] <= q["q100"] <= 1.0 + 1e-9
