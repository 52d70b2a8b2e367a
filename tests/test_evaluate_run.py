"""evaluate degrades instead of dying, records the decoder, and scores images in bounded memory."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _builders import decoded_ridge_run, tiny_text_tower, tiny_unclip
from pipeline.decoding import decode
from pipeline.decoding.run import decode_run
from pipeline.evaluation import metrics as M
from pipeline.evaluation.runs import evaluate_run
from pipeline.store import LazyRows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(demo_root, demo_fmri, demo_clip, tmp_path_factory) -> Path:
    """A decoded ridge run (image_embeds, text_embeds) of the demo's subject 1."""
    return decoded_ridge_run(demo_fmri(), demo_clip(), demo_root, tmp_path_factory.mktemp("evalrun") / "run",
                             ["image_embeds", "text_embeds"])


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_missing_coco_instances_make_zero_shot_unavailable(run, demo_root, tmp_path):
    root = tmp_path / "nsd"
    shutil.copytree(demo_root, root)
    for path in root.glob("nsddata_stimuli/stimuli/nsd/annotations/instances_*.json"):
        path.unlink()
    out = evaluate_run(_copy(run, tmp_path / "run"), root)
    written = json.loads((tmp_path / "run/metrics.json").read_text())
    assert written == json.loads(json.dumps(out))
    assert "COCO instances file not found" in written["brainclip"]["zero_shot"]["unavailable"]
    assert "COCO instances file not found" in written["unavailable"]["zero_shot"]
    assert 0 < written["reconstruction"]["SSIM"] <= 1 and isinstance(written["brainclip"]["fmri_to_text_top1"], float)
    assert written["decoder"] == {"method": "retrieval", "target": "image_embeds", "samples": 1, "include_test": False}


def test_missing_clip_cache_makes_retrieval_and_brainclip_unavailable(run, demo_root, tmp_path):
    folder = _copy(run, tmp_path / "run")
    info = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**info, "clip": str(tmp_path / "gone.zarr")}))
    out = evaluate_run(folder, demo_root)
    for key in ("retrieval_image_to_brain", "zero_shot", "fmri_to_text_top1"):
        assert "CLIP cache of the run not found" in out["unavailable"][key]
    assert "PixCorr" in out["reconstruction"] and (folder / "metrics.json").is_file()


def test_missing_reconstruction_is_one_clear_error(run, demo_root, tmp_path):
    from pipeline.errors import UserError

    folder = _copy(run, tmp_path / "run")
    first = sorted((folder / "recon").glob("*.png"))[0]
    first.unlink()
    with pytest.raises(UserError, match=f"no reconstruction of 1 test images .*{first.name}"):
        evaluate_run(folder, demo_root)
    assert not (folder / "metrics.json").exists()



def test_only_label_arrays_are_rois(run):
    import zarr

    from pipeline.fitting.pairs import roi_names

    g = zarr.open_group(json.loads((run / "run.json").read_text())["fmri"], mode="r")
    assert {"ijk", "invalid_sessions"} <= set(g["voxels"].array_keys())
    assert roi_names(g) == g.attrs["rois"]  # the ROI files prepare-fmri read, in its order


@pytest.mark.parametrize("name", ["ijk", "invalid_sessions", "hippocampus", "floc-faces/no-such-label"])
def test_drop_rois_refuses_what_is_not_an_roi_before_any_work(run, demo_root, tmp_path, name):
    import zarr
    from typer.testing import CliRunner

    from cli import app

    folder = _copy(run, tmp_path / "run")
    sorted((folder / "recon").glob("*.png"))[0].unlink()  # any scoring would now fail on this instead
    rois = zarr.open_group(json.loads((folder / "run.json").read_text())["fmri"], mode="r").attrs["rois"]
    result = CliRunner().invoke(app, ["evaluate", "--run", str(folder), "--nsd-root", str(demo_root),
                                      "--drop-rois", f"prf-visualrois,{name}"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"--drop-rois: no ROI {name!r} in the run's stores (ROI files: {', '.join(rois)};" in result.output
    assert not (folder / "metrics.json").exists()


def test_drop_rois_on_a_ridge_run_removes_the_roi_voxels(run, demo_root, tmp_path):
    import zarr

    folder = _copy(run, tmp_path / "run")
    g = zarr.open_group(json.loads((folder / "run.json").read_text())["fmri"], mode="r")
    out = evaluate_run(folder, demo_root, drop_rois=["prf-visualrois", "floc"])
    floc = np.any([g[f"voxels/{f}"][:] > 0 for f in ("floc-bodies", "floc-faces", "floc-places", "floc-words")], 0)
    assert out["drop_rois"]["prf-visualrois"]["dropped_voxels"] == int((g["voxels/prf-visualrois"][:] > 0).sum())
    assert out["drop_rois"]["floc"]["dropped_voxels"] == int(floc.sum()) > 0

def test_unclip_decoder_settings_reach_metrics_json(run, demo_root, tmp_path):

    model = tmp_path / "tiny-unclip"
    tower = tmp_path / "tower"
    tower.mkdir()
    tiny_unclip(text_tower=tiny_text_tower(tower)).save_pretrained(model)
    folder = _copy(run, tmp_path / "run")
    decode_run(folder, demo_root, method="unclip", unclip_model=str(model), steps=1, seed=3)
    out = evaluate_run(folder, demo_root)
    assert out["decoder"] == {"method": "unclip", "target": "image_embeds", "samples": 1, "include_test": False,
                              "unclip_model": str(model), "steps": 1, "guidance": decode.GUIDANCE, "noise_level": 0,
                              "seed": 3, "detail_target": None, "strength": None}


def test_one_guidance_default():
    defaults = {inspect.signature(f).parameters["guidance"].default
                for f in (decode_run, decode.unclip_decode, decode.denoise)}
    assert defaults == {decode.GUIDANCE} == {10.0}


def test_lazy_batched_images_score_as_arrays():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (7, 40, 40, 3), dtype=np.uint8)
    rec = np.clip(gt.astype(int) + rng.integers(-40, 40, gt.shape), 0, 255).astype(np.uint8)
    whole = M.evaluate(gt, rec, metrics=(), size=32)
    lazy = M.evaluate(LazyRows(lambda ids: gt[ids], np.arange(7)), LazyRows(lambda ids: rec[ids], np.arange(7)),
                      metrics=(), size=32, batch_size=3)
    assert lazy == whole


def test_cross_correlation_matches_numpy_in_blocks():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 37)).astype(np.float32), rng.normal(size=(4, 37)).astype(np.float32)
    a[2] = 3.0  # constant row: NaN, as np.corrcoef gives
    expected = np.corrcoef(a.astype(np.float64), b.astype(np.float64))[:5, 5:]
    np.testing.assert_allclose(M.cross_correlation(a, b, block=8), expected, rtol=1e-12, equal_nan=True)


PEAK_SCRIPT = """
import resource, sys
import numpy as np
sys.path.insert(0, {root!r})
from pipeline.evaluation import metrics as M
from pipeline.store import LazyRows
import skimage.metrics, torchvision.transforms.functional  # imported before the baseline
n, px = {n}, {px}
def synthetic(ids):  # reconstructions made on the fly, like PNGs read batch by batch
    return np.stack([np.random.default_rng(int(i)).integers(0, 256, (px, px, 3), dtype=np.uint8) for i in ids])
gt, rec = LazyRows(synthetic, np.arange(n)), LazyRows(synthetic, np.arange(n) + n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
M.evaluate(gt, rec, metrics=(), batch_size=8)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_image_metrics_run_in_bounded_memory():
    """100 pairs at 768 px: 1.4 GB per set as float64 at full size (the old all-at-once path grew
    by > 3 GB), 79 MB per set at 256 px float32 plus one batch in flight."""
    code = PEAK_SCRIPT.format(root=str(ROOT), n=100, px=768)
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown < 1e9, f"peak RSS grew by {grown / 1e6:.0f} MB"


def test_evaluate_stage_reads_weights_and_protocol_from_params(tmp_path, monkeypatch):
    """evaluate.weights / pool / draws / seed in params.yaml reach evaluate_run (they have no CLI option)."""
    from typer.testing import CliRunner

    import pipeline.evaluation.runs as runs
    from cli import app

    seen = {}

    def fake(run, root, **kwargs):
        seen.update(kwargs, run=run, root=root)
        return {"reconstruction": {}, "unavailable": {}}

    monkeypatch.setattr(runs, "evaluate_run", fake)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "evaluate:\n  nsd_root: somewhere\n  weights: {alexnet: /w/alexnet.pth}\n  pool: 100\n  draws: 3\n  seed: 7\n")
    result = CliRunner().invoke(app, ["evaluate", "--run", "runs/x"])
    assert result.exit_code == 0, result.output
    assert seen["weights"] == {"alexnet": "/w/alexnet.pth"}
    assert (seen["pool"], seen["draws"], seen["seed"]) == (100, 3, 7)
