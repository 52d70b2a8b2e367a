"""Stage 2 on the video caches: the perception adapter (shapes, learning, save/reload), both branches
through fit-adapters (clip ids pair fMRI rows with cache rows), and mismatched caches refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline.errors import UserError
from pipeline.fitting.adapters.perception import Perception, PerceptionConfig
from pipeline.fitting.data import CacheDataset
from pipeline.fitting.models import build_adapter, load_adapter, predict
from pipeline.fitting.pairs import open_pairs
from pipeline.fitting.train import train

SMALL = dict(width=32, hidden=64, depth=1, channels=(16, 8), dropout=0.0, head_dropout=0.0)


def test_output_shapes_for_pixels_and_latents():
    torch.manual_seed(0)
    pix = Perception(PerceptionConfig(**SMALL), 40, {"frames": (6, 16, 16, 3)}, {"input": np.arange(40)})
    lat = Perception(PerceptionConfig(target="frame_latents", **SMALL), 40, {"frame_latents": (6, 4, 8, 8)},
                     {"input": np.arange(0, 40, 2)})
    x = torch.randn(3, 40)
    assert pix(x)["frames"].shape == (3, 6, 16, 16, 3)
    assert lat(x)["frame_latents"].shape == (3, 6, 4, 8, 8)
    with pytest.raises(UserError, match="must be square and divisible by 2"):
        Perception(PerceptionConfig(**SMALL), 40, {"frames": (6, 15, 15, 3)}, {"input": np.arange(40)})
    with pytest.raises(UserError, match=r"expected \(frames, H, W, 3\)"):
        Perception(PerceptionConfig(**SMALL), 40, {"frames": (6, 16)}, {"input": np.arange(40)})



def test_the_docstring_states_the_parameter_counts():
    """Counted on the meta device (no memory): the defaults at cc2017 subject 1's 13,447 voxels for 6
    frames of 4 x 28 x 28 latents, and the published expansion (Linear(256, 6 V) + one Linear(V, 4096))."""
    from pipeline.fitting.adapters import perception

    voxels, frames = 13_447, 6
    with torch.device("meta"):
        model = Perception(PerceptionConfig(target="frame_latents"), voxels, {"frame_latents": (frames, 4, 28, 28)},
                           {"input": np.arange(voxels)})
        published = [torch.nn.Linear(256, frames * voxels), torch.nn.Linear(voxels, 4096)]
    n_published = sum(p.numel() for layer in published for p in layer.parameters())
    doc = " ".join(perception.__doc__.split())
    for count in (model.n_params, model.parameter_counts()["expand"], n_published):
        assert f"{count:,}" in doc, count

def test_frames_decode_independently_until_the_temporal_layers_train():
    """The temporal convolutions start at zero: a clip's frames are then decoded from their own vectors."""
    torch.manual_seed(0)
    model = Perception(PerceptionConfig(**SMALL), 10, {"frames": (4, 8, 8, 3)}, {"input": np.arange(10)}).eval()
    x = torch.randn(2, 10)
    with torch.no_grad():
        base = model(x)["frames"]
        model.expand[0].weight[64:128] += 1.0  # perturb frame 1's vector only
        moved = model(x)["frames"]
    changed = (moved - base).abs().amax(dim=(0, 2, 3, 4))
    assert changed[1] > 0 and torch.all(changed[[0, 2, 3]] == 0)


def test_learns_a_planted_mapping():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 20)).astype(np.float32)
    colour = np.clip(128 + 60 * x[:, :3], 0, 255)  # each clip's frames are one colour, set by 3 voxels
    frames = np.broadcast_to(colour[:, None, None, None, :], (96, 4, 8, 8, 3)).astype(np.float32)
    data = CacheDataset(x, np.arange(96), {"frames": frames}, ["frames"])
    model = build_adapter("perception", SMALL, data.subset(np.arange(80)))
    train(model, data.subset(np.arange(80)), {"epochs": 60, "batch_size": 16, "lr": 3e-3, "val_fraction": 0,
                                              "progress": False})
    pred = predict(model, x[80:])["frames"]
    r = np.corrcoef(pred.mean((1, 2, 3)).ravel(), colour[80:].ravel())[0, 1]
    assert r > 0.8, r


def params_yaml(caches, extra: str = "") -> str:
    return f"""
fit_video:
  fmri: {caches['fmri']}
  clip: {caches['clip']}
  seed: 0
  device: cpu
  experiments:
    sem: {{method: ridge, targets: [image_embeds, frame_embeds]}}
    per: {{method: perception, targets: [frames]}}
  ridge: {{alphas: [1.0, 100.0, 10000.0], cv: 3}}
  perception:
    width: 32
    hidden: 64
    depth: 1
    channels: [16, 8]
    train: {{epochs: 2, batch_size: 64, lr: 0.003, patience: null, progress: false}}
{extra}"""


def test_both_branches_run_through_fit_adapters(video_caches, tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(params_yaml(video_caches))
    monkeypatch.chdir(tmp_path)
    fmri = zarr.open_group(video_caches["fmri"], mode="r")
    clip = zarr.open_group(video_caches["clip"], mode="r")
    for exp, target, shape in (("sem", "image_embeds", (50, 32)), ("per", "frames", (50, 6, 32, 32, 3))):
        result = CliRunner().invoke(app, ["fit-adapters", "--section", "fit_video", "--experiment", exp])
        assert result.exit_code == 0, result.output
        preds = zarr.open_group(tmp_path / "runs" / exp / "predictions.zarr", mode="r")
        assert preds[f"test/{target}"].shape == shape
        np.testing.assert_array_equal(preds["test/clip_ids"][:], fmri["test/clip_ids"][:])
        assert "test/image_ids" not in preds
    report = json.loads((tmp_path / "runs/sem/fit_report.json").read_text())
    assert report["targets"]["image_embeds"]["two_way_identification"] > 0.6  # the planted keyframe signal
    truth = clip["image_embeds"].get_orthogonal_selection((fmri["test/clip_ids"][:],))
    pred = zarr.open_group(tmp_path / "runs/sem/predictions.zarr", mode="r")["test/image_embeds"][:]
    assert np.mean([np.corrcoef(pred[:, d], truth[:, d])[0, 1] for d in range(32)]) == pytest.approx(
        report["targets"]["image_embeds"]["pearson_r"], abs=1e-4)
    model = load_adapter(tmp_path / "runs/per/adapters/perception")
    again = predict(model, fmri["test/betas"][:])["frames"]
    saved = zarr.open_group(tmp_path / "runs/per/predictions.zarr", mode="r")["test/frames"][:]
    np.testing.assert_allclose(again, saved, rtol=1e-5, atol=1e-3)


def test_caches_with_other_clip_layouts_are_refused(video_caches, tmp_path):
    other = tmp_path / "other.zarr"
    shutil.copytree(video_caches["fmri"], other)
    g = zarr.open_group(other, mode="r+")
    layout = dict(g.attrs["clip_layout"])
    g.attrs["clip_layout"] = {**layout, "trs_per_segment": 24}
    with pytest.raises(UserError, match="number their rows differently"):
        open_pairs(other, video_caches["clip"], ["image_embeds"])
    pairs = open_pairs(video_caches["fmri"], video_caches["clip"], ["frames"])
    assert pairs.row_key == "clip_ids" and pairs.target("frames").shape[1:] == (6, 32, 32, 3)
    assert len(pairs.image_ids("test")) == 50
