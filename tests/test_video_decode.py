"""decode-video: interpolate against a planted translation, keyframe retrieval against brute force,
latents through the VAE, tiny offline AnimateDiff (saved pipeline, or SD folder + MotionAdapter),
unCLIP keyframes, and the outputs: mp4s of F frames at the clip frame rate, lossless contact sheets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import zarr
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from _builders import tiny_text_tower, tiny_unclip
from cli import app
from pipeline.decoding import video
from pipeline.decoding.video_run import decode_video_run
from pipeline.demo.video import tiny_animatediff, tiny_animatediff_components
from pipeline.errors import UserError
from pipeline.features.video import load_vae
from pipeline.fitting.fit import fit_adapters


def texture(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = gaussian_filter(rng.uniform(0, 255, (size, size, 3)), (0.8, 0.8, 0), mode="wrap")
    return np.clip((img - img.mean()) * 4 + 128, 0, 255).astype(np.uint8)


def test_interpolate_follows_the_blurry_frames_motion():
    key = texture(32)
    moves = [(0, -2), (0, -1), (0, 0), (1, 1), (2, 2), (3, 2)]  # (dy, dx) of each frame; keyframe = frame 2
    blurry = np.stack([gaussian_filter(np.roll(key, m, axis=(0, 1)).astype(float), (2, 2, 0), mode="wrap")
                       for m in moves]).astype(np.uint8)
    np.testing.assert_allclose(video.frame_shifts(blurry, 2), moves, atol=0.3)
    out = video.interpolate(key, blurry, key=2, size=32)
    assert out.shape == (6, 32, 32, 3) and out.dtype == np.uint8
    inner = (slice(6, -6), slice(6, -6))  # away from the edge padding of the shift
    for f, m in enumerate(moves):
        def r(a, b):
            return np.corrcoef(a[inner].ravel(), b[inner].ravel())[0, 1]
        assert r(out[f].astype(float), np.roll(key, m, axis=(0, 1))) > 0.9
        if m != (0, 0):
            assert r(out[f].astype(float), key) < r(out[f].astype(float), np.roll(key, m, axis=(0, 1))) - 0.1


def test_retrieval_keyframes_match_brute_force():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(30, 8)).astype(np.float32)
    frames = rng.integers(0, 255, (30, 6, 4, 4, 3), dtype=np.uint8)
    pred = bank[[3, 20, 21]] + 0.01
    keys, rows = video.retrieval_keyframes(pred, bank, frames, keyframe=2, exclude=[20, 21])
    cos = (pred @ bank.T) / np.linalg.norm(pred, axis=1)[:, None] / np.linalg.norm(bank, axis=1)[None]
    cos[:, [20, 21]] = -np.inf
    np.testing.assert_array_equal(rows, cos.argmax(1))
    assert rows[0] == 3 and not np.isin(rows, [20, 21]).any()
    np.testing.assert_array_equal(keys, frames[rows, 2])


def test_blurry_frames_from_latents_go_through_the_vae(video_root):
    vae = load_vae(str(video_root / "demo/tiny-animatediff"))
    lat = np.random.default_rng(2).normal(size=(2, 3, 4, 4, 4)).astype(np.float32)
    frames = video.blurry_frames(lat, "frame_latents", vae)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(lat.reshape(6, 4, 4, 4)) / vae.config.scaling_factor).sample
    ref = ((ref.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy().reshape(2, 3, 32, 32, 3)
    np.testing.assert_array_equal(frames, ref)
    np.testing.assert_array_equal(video.blurry_frames(np.full((1, 2, 4, 4, 3), 300.0), "frames"), 255)
    with pytest.raises(UserError, match="needs the VAE"):
        video.blurry_frames(lat, "frame_latents")


def test_clip_outputs_have_the_right_length_and_rate(tmp_path):
    frames = np.random.default_rng(3).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    video.write_clip(tmp_path, 217, frames, fps=3.0)
    with av.open(str(tmp_path / "00217.mp4")) as c:
        stream = c.streams.video[0]
        decoded = [f for f in c.decode(stream)]
        assert len(decoded) == 6 and stream.average_rate == 3
        assert float(decoded[-1].time) == pytest.approx(5 / 3) and float(stream.duration * stream.time_base) == 2.0
    np.testing.assert_array_equal(video.read_clips(tmp_path, [217], 6)[0], frames)  # the PNG sheet is lossless
    with pytest.raises(UserError, match="reconstruction of clip 218 not found"):
        video.read_clips(tmp_path, [218], 6)


@pytest.fixture(scope="module")
def animatediff_dirs(tmp_path_factory) -> dict[str, Path]:
    """A saved AnimateDiff video-to-video pipeline, and the same as an SD 1.x folder + MotionAdapter folder."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("animatediff")
    tiny_animatediff().save_pretrained(root / "pipeline")
    parts = tiny_animatediff_components()
    adapter = parts.pop("motion_adapter")
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "sd")
    adapter.save_pretrained(root / "adapter")
    return {"pipeline": root / "pipeline", "sd": root / "sd", "adapter": root / "adapter"}


def test_diffusion_decodes_each_clip_on_its_own_seed(animatediff_dirs):
    pipe = video.load_animatediff(animatediff_dirs["pipeline"], local_files_only=True)
    init = np.random.default_rng(4).integers(0, 255, (2, 6, 32, 32, 3), dtype=np.uint8)
    both = video.diffusion_decode(pipe, init, [7, 9], steps=2, strength=0.5, guidance=1.0)
    alone = video.diffusion_decode(pipe, init[1:], [9], steps=2, strength=0.5, guidance=1.0)
    assert both.shape == (2, 6, 32, 32, 3) and both.dtype == np.uint8
    assert np.abs(both[1].astype(int) - alone[0]).max() <= 1
    other = video.diffusion_decode(pipe, init[1:], [9], steps=2, strength=0.5, guidance=1.0, seed=1)
    assert np.abs(other[0].astype(int) - alone[0]).mean() > 0.5
    with pytest.raises(UserError, match="must be a multiple of 8"):
        video.diffusion_decode(pipe, init[:, :, :30, :30], [7, 9], steps=2)

    from_sd = video.load_animatediff(animatediff_dirs["sd"], animatediff_dirs["adapter"], local_files_only=True)
    assert type(from_sd.unet).__name__ == "UNetMotionModel"
    same = video.diffusion_decode(from_sd, init[1:], [9], steps=2, strength=0.5, guidance=1.0)
    assert np.abs(same.astype(int) - alone).max() <= 1  # same random components: the same video
    with pytest.raises(UserError, match="is a StableDiffusionPipeline; give motion_adapter"):
        video.load_animatediff(animatediff_dirs["sd"], local_files_only=True)
    with pytest.raises(UserError, match="local folder not found and not a hub id"):
        video.load_animatediff(animatediff_dirs["sd"] / "nowhere")


def test_diffusion_progress_shows_on_a_terminal_only(animatediff_dirs, capsys, monkeypatch):
    pipe = video.load_animatediff(animatediff_dirs["pipeline"], local_files_only=True)
    init = np.random.default_rng(4).integers(0, 255, (2, 6, 32, 32, 3), dtype=np.uint8)
    kw = dict(steps=2, strength=0.5, guidance=1.0)
    monkeypatch.delenv("CI", raising=False)
    video.diffusion_decode(pipe, init, [7, 9], **kw)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    video.diffusion_decode(pipe, init, [7, 9], **kw)
    err = capsys.readouterr().err
    assert "animatediff" in err and "2/2" in err and "denoising steps" in err
    monkeypatch.setenv("CI", "true")
    video.diffusion_decode(pipe, init[:1], [7], **kw)
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def video_runs(video_caches, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video_runs")
    fit_adapters(video_caches["fmri"], video_caches["clip"], "ridge", root / "sem", targets=["image_embeds"],
                 params={"alphas": [10.0, 1000.0], "cv": 3}, progress=False)
    fit_adapters(video_caches["fmri"], video_caches["clip"], "perception", root / "per", targets=["frames"],
                 params=dict(width=32, hidden=64, depth=1, channels=(16, 8)),
                 train={"epochs": 1, "batch_size": 64, "val_fraction": 0, "progress": False}, progress=False)
    return {"semantic": root / "sem", "perception": root / "per"}


def test_decode_video_writes_one_clip_per_test_clip(video_caches, video_runs, animatediff_dirs, tmp_path):
    ids = zarr.open_group(video_caches["fmri"], mode="r")["test/clip_ids"][:]
    out = decode_video_run(video_runs["semantic"], video_runs["perception"], tmp_path / "interp")
    info = json.loads((out / "decode.json").read_text())
    assert info["clip_ids"] == ids.tolist() and info["frames_per_clip"] == 6
    assert json.loads((out / "timings.json").read_text())["seconds_per_clip"] > 0
    assert sorted(p.name for p in (out / "recon_video").iterdir())[:2] == ["00200.mp4", "00200.png"]
    assert len(list((out / "recon_video").glob("*.mp4"))) == 50 and (out / "recon_grid.png").is_file()
    rec = video.read_clips(out / "recon_video", ids, 6)
    assert rec.shape == (50, 6, 32, 32, 3)

    diff = decode_video_run(video_runs["semantic"], video_runs["perception"], tmp_path / "diff", method="diffusion",
                            video_model=str(animatediff_dirs["pipeline"]), steps=2, strength=0.5, guidance=1.0)
    assert json.loads((diff / "timings.json").read_text())["seconds"]["diffusion"] > 0
    assert np.abs(video.read_clips(diff / "recon_video", ids, 6).astype(int) - rec).mean() > 1


def test_unclip_keyframes(video_runs, tmp_path):
    pipe = tiny_unclip(text_tower=tiny_text_tower(tmp_path))
    pipe.save_pretrained(tmp_path / "unclip")
    out = decode_video_run(video_runs["semantic"], video_runs["perception"], tmp_path / "u", keyframes="unclip",
                           unclip_model=str(tmp_path / "unclip"), unclip_steps=1, size=32)
    assert json.loads((out / "decode.json").read_text())["unclip_model"] == str(tmp_path / "unclip")


def test_bad_decode_inputs(video_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["decode-video", "--semantic", str(video_runs["semantic"]), "--perception", str(video_runs["perception"]),
            "--out", str(tmp_path / "x")]
    for args, message in (
        (["--method", "diffusion"], "--method diffusion: give --video-model"),
        (["--method", "gan"], "--method must be one of interpolate, diffusion"),
        (["--keyframes", "unclip"], "--keyframes unclip: give --unclip-model"),
        (["--size", "33"], "--size 33: must be even"),
        (["--semantic", str(video_runs["perception"])], "has no test/image_embeds"),
        (["--perception", str(video_runs["semantic"])], "has no test/frames or test/frame_latents"),
    ):
        result = CliRunner().invoke(app, base + args)
        assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output
        assert not (tmp_path / "x").exists()
