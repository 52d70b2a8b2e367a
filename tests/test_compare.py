"""evaluate's intervals and per-image file, and compare of evaluated runs.

One demo run is decoded and evaluated once (module fixture); the other runs are derived from its
``per_image.npz`` (a planted difference, other test ids) or written directly with known scores, so
no test evaluates again. That evaluate writes the same ``per_image.npz`` bytes twice is
tests/test_reproducible.py's check (every stage output, two folders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _builders import decoded_ridge_run
from cli import app
from pipeline.evaluation.compare import compare_runs, holm
from pipeline.evaluation.intervals import add_intervals, flatten, read_per_image, write_per_image
from pipeline.evaluation.runs import evaluate_run


@pytest.fixture(scope="module")
def evaluated(demo_root, demo_fmri, demo_clip, tmp_path_factory) -> Path:
    """A decoded and evaluated ridge run (image_embeds) of the demo's subject 1."""
    run = decoded_ridge_run(demo_fmri(), demo_clip(), demo_root, tmp_path_factory.mktemp("comparerun") / "run",
                            ["image_embeds"])
    evaluate_run(run, demo_root)
    return run


def _derived(run: Path, dest: Path, edit) -> Path:
    """A run folder holding only ``run``'s per-image file after ``edit(ids, details)`` (in place)."""
    ids, details = read_per_image(run / "per_image.npz")
    edit(ids, details)
    dest.mkdir()
    write_per_image(dest / "per_image.npz", flatten(details, ids))
    return dest


def _synthetic(dest: Path, groups: dict[str | None, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A run folder with known per-image SSIM scores: ``{subject or None: (test_ids, scores)}``."""
    dest.mkdir()
    write_per_image(dest / "per_image.npz", flatten({k: {"SSIM": {"scores": s}} for k, (_, s) in groups.items()},
                                                    {k: ids for k, (ids, _) in groups.items()}))
    return dest


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
    lo, hi = out["ci95"]["brainclip"]["zero_shot"]["top1"]  # BrainCLIP's numbers too, at their key paths
    assert lo <= out["brainclip"]["zero_shot"]["top1"] <= hi


def test_intervals_follow_from_the_per_image_file_and_its_bytes_from_its_arrays(evaluated, tmp_path):
    ids, details = read_per_image(evaluated / "per_image.npz")
    again: dict = {}
    add_intervals(again, details, ids)  # the default seed and draws, from the file alone
    written = json.loads((evaluated / "metrics.json").read_text())["ci95"]
    for section, row in again["ci95"].items():
        assert row == {key: written[section][key] for key in row}
    write_per_image(tmp_path / "copy.npz", flatten(details, ids))
    assert (tmp_path / "copy.npz").read_bytes() == (evaluated / "per_image.npz").read_bytes()


def test_a_run_against_itself_differs_by_zero_with_p_one(evaluated):
    result = compare_runs([evaluated, evaluated], draws=200, permutations=500)
    rows = result["comparisons"][0]["metrics"]
    assert {"PixCorr", "SSIM", "retrieval_image_to_brain"} <= set(rows)
    for row in rows.values():
        assert row["difference"] == 0 and row["ci95"] == [0.0, 0.0]
        assert row["p"] == 1.0 and row["p_holm"] == 1.0


def test_a_planted_difference_is_separated(evaluated, tmp_path):
    def perfect_first_20(ids, details):  # what the ground truth as reconstruction of 20 images scores
        for detail in details[None].values():
            if "scores" in detail:
                detail["scores"][:20] = 1.0
            else:
                detail["fail"][:, :20] = False  # the 20 now beat every distractor
    better = _derived(evaluated, tmp_path / "better", perfect_first_20)
    rows = compare_runs([evaluated, better], draws=300, permutations=2000)["comparisons"][0]["metrics"]
    for name in ("SSIM", "PixCorr"):
        assert rows[name]["difference"] > 0 and rows[name]["ci95"][0] > 0 and rows[name]["p_holm"] < 0.01, name
    assert rows["retrieval_image_to_brain"]["difference"] >= 0  # the demo's retrieval is near its ceiling already


def test_paired_differences_match_their_definition_on_known_scores(tmp_path):
    rng = np.random.default_rng(0)
    ids, a = np.arange(60), rng.uniform(0.2, 0.6, 60)
    b = a + rng.normal(0.0, 0.05, 60)
    runs = [_synthetic(tmp_path / "a", {None: (ids, a)}), _synthetic(tmp_path / "b", {None: (ids, b)})]
    row = compare_runs(runs, draws=400, permutations=400)["comparisons"][0]["metrics"]["SSIM"]
    assert row["difference"] == pytest.approx(b.mean() - a.mean())
    d = b - a
    se = d.std(ddof=1) / np.sqrt(len(d))  # the bootstrap interval is about the normal one of a mean
    assert row["ci95"] == pytest.approx([d.mean() - 1.96 * se, d.mean() + 1.96 * se], abs=0.6 * se)


def test_compare_refuses_runs_on_other_test_images(evaluated, tmp_path):
    def reverse(ids, details):
        ids[None] = ids[None][::-1]
    other = _derived(evaluated, tmp_path / "other", reverse)
    result = CliRunner().invoke(app, ["compare", str(evaluated), str(other)])
    assert result.exit_code == 1 and "differ in their test images" in result.output


def test_compare_refuses_runs_of_other_subjects(tmp_path):
    ids, s = np.arange(10), np.linspace(0, 1, 10)
    a = _synthetic(tmp_path / "a", {"subj01": (ids, s), "subj02": (ids, s)})
    b = _synthetic(tmp_path / "b", {"subj01": (ids, s), "subj05": (ids, s)})
    result = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 1 and "compare runs of the same subjects" in result.output


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
