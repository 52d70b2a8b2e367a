"""decode-video over two fit-adapters runs of a video cache: the semantics run (predicted keyframe
``image_embeds``) and the perception run (predicted ``frames`` or ``frame_latents``) ->
``<out>/recon_video/`` (one mp4 and one contact-sheet PNG per test clip), ``<out>/recon_grid.png``
and ``<out>/decode.json`` (settings, clip ids, seconds per clip). Methods: :mod:`.video`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import zarr

from ..device import resolve_device
from ..errors import UserError
from ..features.cache import open_cache
from ..features.video import load_vae
from ..fitting.run_folder import RunInfo
from ..store import atomic_dir, atomic_file, take_rows, write_text, write_timings
from ..videoio import square
from . import decode, video
from .run import open_run, run_prediction

DECODERS = ("interpolate", "diffusion")
KEYFRAMES = ("retrieval", "unclip")
BLURRY_TARGETS = ("frames", "frame_latents")


def _single_subject(run: Path) -> tuple[RunInfo, zarr.Group, np.ndarray]:
    """A run's info, predictions group and test clip ids; multi-subject runs are decoded per subject
    only by ``decode`` (images), not here yet."""
    info, groups = open_run(run)
    if None not in groups:
        raise UserError(f"{run} is a multi-subject run ({', '.join(groups)}); decode-video reads single-subject "
                        "runs: fit the video branches on one subject's store")
    return (info, *groups[None])


def _runs(semantic: Path, perception: Path) -> tuple[dict, dict, np.ndarray]:
    """Both runs, checked to predict the same test clips of the same video cache."""
    info_s, preds_s, ids_s = _single_subject(semantic)
    info_p, preds_p, ids_p = _single_subject(perception)
    if Path(info_s.clip).resolve() != Path(info_p.clip).resolve():
        raise UserError(f"{semantic} and {perception} were fitted on different CLIP caches "
                        f"({info_s.clip} vs {info_p.clip})")
    if not np.array_equal(ids_s, ids_p):
        raise UserError(f"{semantic} and {perception} predict different test clips; fit both on the same fMRI cache")
    return {"info": info_s, "preds": preds_s}, {"info": info_p, "preds": preds_p}, ids_s


def decode_video_run(
    semantic: Path | str, perception: Path | str, out: Path | str, *, method: str = "interpolate",
    keyframes: str = "retrieval", semantic_target: str = "image_embeds", size: int | None = None,
    unclip_model: str | None = None, unclip_steps: int = 20, unclip_guidance: float = decode.GUIDANCE,
    video_model: str | None = None, motion_adapter: str | None = None, steps: int = 25, strength: float = 0.6,
    guidance: float = 7.5, prompt: str = "", seed: int = 0, device: str = "auto", grid_clips: int = 6,
) -> Path:
    """Reconstruct every test clip; returns ``out``. See :mod:`.video` for the methods."""
    device = str(resolve_device(device))
    if method not in DECODERS:
        raise UserError(f"--method must be one of {', '.join(DECODERS)}, not {method!r}")
    if keyframes not in KEYFRAMES:
        raise UserError(f"--keyframes must be one of {', '.join(KEYFRAMES)}, not {keyframes!r}")
    if method == "diffusion" and video_model is None:
        raise UserError("--method diffusion: give --video-model (an AnimateDiff pipeline folder, or a Stable "
                        "Diffusion 1.x folder / hub id with --motion-adapter)")
    if keyframes == "unclip" and unclip_model is None:
        raise UserError("--keyframes unclip: give --unclip-model (a Stable unCLIP hub id or local folder)")
    semantic, perception, out = Path(semantic), Path(perception), Path(out)
    sem, per, ids = _runs(semantic, perception)
    store = open_cache(sem["info"].clip, rows=ids)
    v = store.attrs.get("video")
    if v is None:
        raise UserError(f"{sem['info'].clip} is not a video cache (made by extract-clip --video)")
    targets = [t for t in BLURRY_TARGETS if f"test/{t}" in per["preds"]]
    if not targets:
        raise UserError(f"{perception}/predictions.zarr has no test/frames or test/frame_latents; fit the perception "
                        "adapter there")
    key = v["keyframe"] - 1
    size = int(size or v["frame_size"])
    if size % 2:
        raise UserError(f"--size {size}: must be even (H.264)")
    pred = run_prediction(sem["preds"], semantic, semantic_target)
    blurry_pred = per["preds"][f"test/{targets[0]}"][...]

    start = time.perf_counter()  # weights first, so the timings below are decoding only
    vae = load_vae(v["vae"], device) if targets[0] == "frame_latents" else None
    unclip = decode.load_unclip(unclip_model, device=device) if keyframes == "unclip" else None
    animate = video.load_animatediff(video_model, motion_adapter, device=device) if method == "diffusion" else None
    timings = {"load": time.perf_counter() - start}

    t = time.perf_counter()
    blurry = video.blurry_frames(blurry_pred, targets[0], vae)
    if unclip is None:
        keys, _ = video.retrieval_keyframes(pred, store[semantic_target], store["frames"], key, exclude=ids)
    else:
        keys = decode.unclip_decode(unclip, pred, ids, steps=unclip_steps, guidance=unclip_guidance, seed=seed)[:, 0]
    timings["keyframes"] = time.perf_counter() - t
    t = time.perf_counter()
    videos = np.stack([video.interpolate(k, b, key, size) for k, b in zip(keys, blurry)])
    timings["interpolate"] = time.perf_counter() - t
    if animate is not None:
        t = time.perf_counter()
        videos = video.diffusion_decode(animate, videos, ids, steps=steps, strength=strength, guidance=guidance,
                                        prompt=prompt, seed=seed)
        timings["diffusion"] = time.perf_counter() - t

    with atomic_dir(out / "recon_video") as tmp:
        for clip_id, frames in zip(ids, videos):
            video.write_clip(tmp, int(clip_id), frames, v["fps"])
    gt = np.stack([[square(f, size) for f in clip] for clip in take_rows(store["frames"], ids[:grid_clips])])
    with atomic_file(out / "recon_grid.png") as tmp:
        video.write_video_grid(tmp, gt, videos[: len(gt)])
    record = {
        "method": method, "keyframes": keyframes, "semantic_run": str(semantic), "perception_run": str(perception),
        "semantic_target": semantic_target, "perception_target": targets[0], "clip": sem["info"].clip,
        "clip_ids": ids.tolist(), "frames_per_clip": v["frames_per_clip"], "fps": v["fps"], "size": size,
        "unclip_model": unclip_model if keyframes == "unclip" else None,
        "video_model": video_model if method == "diffusion" else None,
        "motion_adapter": motion_adapter if method == "diffusion" else None,
        "steps": steps, "strength": strength, "guidance": guidance, "prompt": prompt, "seed": seed, "device": device,
    }
    write_text(out / "decode.json", json.dumps(record, indent=2))
    write_timings(out, {  # not in decode.json: every DVC-hashed output must repeat byte for byte
        "seconds_per_clip": round(sum(s for k, s in timings.items() if k != "load") / len(ids), 4),
        "seconds": {k: round(s, 3) for k, s in timings.items()},
        "seconds_note": "per clip: keyframes + blurry frames + interpolate (+ diffusion), weights loading excluded",
    })
    return out
