"""extract-clip --video against decoding the mp4s directly (PyAV, frame by frame) and the tiny ViT's
own forward pass; the cache layout, clip ids and resume; the VAE latents; bad input."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from _builders import tree
from cli import app
from pipeline.demo.video import DEMO_DESIGN
from pipeline.features import clip
from pipeline.features.cache import filled_rows
from pipeline.features.video import extract_video, load_vae, vae_encode
from pipeline import videoio
from pipeline.videoio import read_frames, write_mp4

D = DEMO_DESIGN
KW = dict(design=D, model="nsd-tiny-vit", layers="2,6,6:proj", frame_size=32, progress=False)


def decoded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame of a video and its presentation time, straight from PyAV."""
    with av.open(str(path)) as c:
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])]
    return np.stack([f for _, f in frames]), np.array([t for t, _ in frames])


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    crop = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def store(video_caches) -> zarr.Group:
    return zarr.open_group(video_caches["clip"], mode="r")


def test_frames_and_clip_ids_match_a_direct_decode(video_root, store):
    loaded = clip.load_model("nsd-tiny-vit", str(video_root / "demo/nsd-tiny-vit.safetensors"))
    for name, first in (("seg2", 25), ("test2", 225)):  # clip id = segment offset + TR
        frames, times = decoded(video_root / "stimuli" / f"{name}.mp4")
        for t in (0, 7, 24):
            clip_id = first + t
            # 3 fps, TR 2 s: frames at t*2 + j/3 s; the frame shown then is the last one starting before
            wanted = [np.flatnonzero(times <= t * 2 + j / 3 + 1e-6)[-1] for j in range(6)]
            assert wanted == [round((t * 2 + j / 3) * 15) for j in range(6)]  # 15 fps movie: exact multiples
            expect = np.stack([square_resize(frames[k], 32) for k in wanted])
            np.testing.assert_array_equal(store["frames"][clip_id], expect)
            px = clip.preprocess_batch(loaded, frames[wanted])
            with torch.no_grad():
                embeds = loaded.model.encode_image(px).numpy()
                tokens, _ = clip.encode_layers(loaded, px[2:3], clip.parse_layers("2,6:proj", 6), clip.TokenMode("all"))
            np.testing.assert_allclose(store["frame_embeds"][clip_id], embeds, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(store["image_embeds"][clip_id], embeds[2], rtol=1e-4, atol=1e-5)  # keyframe 3
            np.testing.assert_allclose(store["layers/2"][clip_id], tokens["2"][0].numpy().astype(np.float16),
                                       rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(store["layers/6_proj"][clip_id], tokens["6_proj"][0].numpy().astype(np.float16),
                                       rtol=2e-3, atol=2e-3)


def test_layout_and_attrs(store):
    assert store["frames"].shape == (250, 6, 32, 32, 3) and store["frames"].dtype == np.uint8
    assert store["frame_embeds"].shape == (250, 6, 32) and store["image_embeds"].shape == (250, 32)
    assert store["layers/6"].shape == (250, 17, 64) and store["layers/6"].shards == (25, 17, 64)  # a segment per shard
    assert "frame_latents" not in store and filled_rows(store).all()
    v = store.attrs["video"]
    assert (v["fps"], v["frames_per_clip"], v["keyframe"], v["frame_size"]) == (3.0, 6, 3, 32)
    assert store.attrs["clip_layout"] == D.clip_layout() and store.attrs["N"] == 250


def test_resume_after_interrupt_is_identical(video_root, video_caches, tmp_path, monkeypatch):
    out = tmp_path / "resumed.zarr"
    kw = {**KW, "pretrained": str(video_root / "demo/nsd-tiny-vit.safetensors")}
    calls, original = [0], zarr.Array.__setitem__

    def interrupt(self, key, value):  # Ctrl-C in the middle of the 4th shard (7 writes per shard)
        calls[0] += 1
        if calls[0] == 7 * 3 + 4:
            raise KeyboardInterrupt
        original(self, key, value)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(zarr.Array, "__setitem__", interrupt)
        extract_video(video_root, out, **kw)
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")["shard_done"][:], [True] * 3 + [False] * 7)
    lines = []
    extract_video(video_root, out, report=lines.append, **kw)
    assert "3 of 10 requested shards already done, writing 7" in lines[0]
    assert tree(out) == tree(video_caches["clip"])


def test_vae_latents_of_the_frames(video_root, tmp_path):
    vae_dir = video_root / "demo/tiny-animatediff"  # a pipeline folder: its vae/ is used
    out = extract_video(video_root, tmp_path / "lat.zarr", pretrained=str(video_root / "demo/nsd-tiny-vit.safetensors"),
                        vae=str(vae_dir), **{**KW, "layers": "6"})
    g = zarr.open_group(out, mode="r")
    assert g["frame_latents"].shape == (250, 6, 4, 4, 4) and g["frame_latents"].dtype == np.float16
    vae = load_vae(str(vae_dir))
    with torch.no_grad():
        ref = vae_encode(vae, torch.from_numpy(g["frames"][[3, 240]].reshape(-1, 32, 32, 3))).numpy()
    np.testing.assert_allclose(g["frame_latents"][[3, 240]].reshape(ref.shape), ref, rtol=1e-2, atol=1e-2)
    assert g.attrs["video"]["vae"] == str(vae_dir)


def test_read_frames_past_the_end_fails(tmp_path):
    frames = np.zeros((10, 16, 16, 3), np.uint8)
    path = write_mp4(tmp_path / "short.mp4", frames, 5.0)
    assert read_frames(path, [0.0, 1.9]).shape == (2, 16, 16, 3)
    with pytest.raises(Exception, match="video ends before 2.50 s"):
        read_frames(path, [0.0, 2.5])


def test_read_frames_converts_only_the_frames_it_keeps(tmp_path, monkeypatch):
    """3 of 30 fps kept: the same frames as decoding all and picking the one shown at each time, and
    one RGB conversion per frame kept (a time asked twice converts once), not one per decoded frame."""
    rng = np.random.default_rng(0)
    frames = np.repeat(np.repeat(rng.integers(0, 256, (60, 4, 4, 3), np.uint8), 4, 1), 4, 2)
    path = write_mp4(tmp_path / "30fps.mp4", frames, 30.0)
    every, when = decoded(path)
    times = np.r_[np.arange(0, 2, 1 / 3), 1.9, 1.9]  # 3 fps, and one frame asked twice
    shown = [every[np.flatnonzero(when <= t + 1e-3)[-1]] for t in times]
    calls = []
    as_rgb = videoio._as_rgb
    monkeypatch.setattr(videoio, "_as_rgb", lambda frame, size: calls.append(frame.time) or as_rgb(frame, size))
    np.testing.assert_array_equal(read_frames(path, times), np.stack(shown))
    assert len(calls) == len(set(calls)) == 7


def test_write_mp4_is_byte_reproducible(tmp_path):
    """DVC hashes the reconstructions: the same frames must give the same bytes on every call (with
    libx264's threads or assembly they did not: about half of such clips differed over 6 calls)."""
    rng = np.random.default_rng(0)
    clips = [np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 8, 3), np.uint8), 4, 1), 4, 2) for _ in range(20)]
    clips.append(np.repeat(np.repeat(rng.integers(0, 256, (16, 16, 16, 3), np.uint8), 16, 1), 16, 2))  # 256 px
    for i, frames in enumerate(clips):
        first = write_mp4(tmp_path / f"{i}.mp4", frames, 3.0).read_bytes()
        for _ in range(3):
            assert write_mp4(tmp_path / "again.mp4", frames, 3.0).read_bytes() == first, f"clip {i}"


Case = namedtuple("Case", "edit args message")


def _truncate(root: Path) -> None:
    path = root / "stimuli/seg4.mp4"
    frames, _ = decoded(path)
    write_mp4(path, frames[: len(frames) // 2], 15.0)


BAD = [
    Case(lambda r: (r / "stimuli/test2.mp4").unlink(), [], "missing 1 movie segment(s): test2.mp4"),
    Case(lambda r: (r / "stimuli/seg1.mp4").write_bytes(b"\x00" * 500), [], "seg1.mp4: not a readable video"),
    Case(_truncate, [], "seg4.mp4: the video lasts 25.00 s but its fMRI covers 50 s"),
    Case(None, ["--fps", "0.7"], "--fps 0.7 does not divide the TR"),
    Case(None, ["--fps", "30"], "--fps 30.0 is above the 15 fps of"),
    Case(None, ["--keyframe", "7"], "--keyframe 7: clips have frames 1..6"),
    Case(None, ["--frame-size", "33"], "--frame-size 33: must be even"),
    Case(None, ["--images", "0-9"], "--images applies to NSD images, not to --video"),
]


@pytest.mark.parametrize("case", BAD, ids=[c.message[:40] for c in BAD])
def test_bad_inputs_fail_with_one_clear_line(video_root, tmp_path, monkeypatch, case):
    root = tmp_path / "cc2017"
    shutil.copytree(video_root / "stimuli", root / "stimuli")
    if case.edit is not None:
        case.edit(root)
    (tmp_path / "params.yaml").write_text(
        "cc2017_design: {" + ", ".join(f"{k}: {v}" for k, v in D.as_dict().items()) + "}\n")
    monkeypatch.chdir(tmp_path)
    args = ["extract-clip", "--video", str(root), "--out", str(tmp_path / "x.zarr"), "--model", "nsd-tiny-vit",
            "--pretrained", str(video_root / "demo/nsd-tiny-vit.safetensors"), "--layers", "6", "--frame-size", "32"]
    result = CliRunner().invoke(app, args + case.args)
    assert result.exit_code == 1, result.output
    assert case.message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "x.zarr").exists()
