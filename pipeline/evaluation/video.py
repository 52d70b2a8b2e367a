"""evaluate-video over a decode-video folder: frame-level SSIM/PSNR, CLIP-pcc and n-way identification
-> ``<run>/metrics.json``, with the JSON conventions of ``evaluate`` (numbers under ``reconstruction``,
metrics that cannot run here under ``unavailable`` with the reason, never a number from random weights
presented as a published metric).

Protocol (MinD-Video / NeuroClips on cc2017; functions in :mod:`.video_metrics`):

- ground truth: each test clip's F frames, read from its mp4 at the times the cache used
  (:class:`pipeline.features.video.VideoSource`), centre square at the reconstruction's size;
- ``SSIM``, ``PSNR``: mean over every frame of every clip;
- CLIP image features of every frame, from the CLIP model the run's cache was made with (its attrs;
  on the demo that is the demo's random tiny ViT, so those numbers exercise code only):
  ``CLIP-pcc`` (adjacent-frame cosine of the reconstructions; the ground truth's own value is
  reported beside it), and n-way identification for n in ``n_ways`` (2 and 50; n is capped at the
  number of test clips and the name says the n used): ``video`` level on the mean frame embedding
  of each clip, ``frame`` level position by position (frame f of a reconstruction against frame f
  of n - 1 other clips), mean over positions;
- with VideoMAE weights present (``videomae``: a folder or hub id of a ``VideoMAEForVideoClassification``,
  default ``MCG-NJU/videomae-base-finetuned-kinetics`` from the Hugging Face cache): MinD-Video's
  n-way top-1 classification of the reconstructed clip against the ground truth's class (the F
  frames are resampled to the model's ``num_frames``); otherwise ``unavailable``.

``ci95`` gives each number's 95 % bootstrap interval over test clips (n-way statistics recomputed
in the resampled set, as the exact expectation over distractor draws; :mod:`.intervals`); the
per-clip scores behind them go to ``<run>/per_clip.npz`` (the format of ``per_image.npz``, byte-
reproducible), which ``compare`` reads.

A CLIP model that cannot be rebuilt from the cache's attrs (:func:`pipeline.features.cache.load_cache_model`:
its config file or checkpoint moved, or its weights are not on this machine) makes the CLIP metrics
``unavailable`` with the reason; the others are still written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..decoding.video import read_clips
from ..device import resolve_device
from ..errors import UserError
from ..features import clip as clip_models
from ..features.cache import load_cache_model, open_cache
from ..features.video import VideoSource
from ..store import write_text
from . import bootstrap, intervals
from .metrics import ssim_each, two_way_failures
from .video_metrics import clip_pcc, n_way_identification, n_way_top1_classification, psnr_each

VIDEOMAE = "MCG-NJU/videomae-base-finetuned-kinetics"


def ground_truth(store, clip_ids: np.ndarray, size: int, video: Path | str | None = None) -> np.ndarray:
    """(n, F, size, size, 3) uint8 frames of ``clip_ids`` decoded from the movies the cache was made from
    (or from the cc2017 root / stimuli folder ``video``)."""
    v = store.attrs["video"]
    stimuli = Path(video) if video is not None else Path(store.attrs["source"]["stimuli"])
    if (stimuli / "stimuli").is_dir():
        stimuli = stimuli / "stimuli"
    layout = store.attrs["clip_layout"]
    source = VideoSource(str(stimuli), tuple(tuple(s) for s in layout["segments"]), layout["tr"], v["fps"],
                         v["keyframe"] - 1, size, None)
    order = np.argsort(clip_ids, kind="stable")
    ids = np.asarray(clip_ids)[order]
    parts, start = [], 0
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    for stop in [*breaks, len(ids)]:  # runs of consecutive clip ids, read in one pass each
        parts.append(source.clip_frames(int(ids[start]), int(ids[stop - 1]) + 1, size))
        start = stop
    frames = np.concatenate(parts)
    out = np.empty_like(frames)
    out[order] = frames
    return out


@torch.no_grad()
def frame_features(loaded: clip_models.LoadedModel, videos: np.ndarray, device: str, batch: int = 64) -> np.ndarray:
    """(n, F, D) ``encode_image`` of every frame through the model's own transform."""
    flat = videos.reshape(-1, *videos.shape[2:])
    parts = []
    for start in range(0, len(flat), batch):
        px = clip_models.preprocess_batch(loaded, flat[start : start + batch]).to(device)
        parts.append(loaded.model.encode_image(px).float().cpu().numpy())
    return np.concatenate(parts).reshape(*videos.shape[:2], -1)


def load_videomae(name: str, device: str):
    """VideoMAE classifier and its image processor from a folder or the HF cache; None and the reason if absent."""
    from transformers import VideoMAEForVideoClassification, VideoMAEImageProcessor

    from ..hub import hf_hub_cache

    try:
        kw = {"local_files_only": True, "cache_dir": str(hf_hub_cache())}
        model = VideoMAEForVideoClassification.from_pretrained(name, **kw).to(device).eval()
        processor = VideoMAEImageProcessor.from_pretrained(name, **kw)
    except Exception as exc:  # OSError / hub errors: not on this machine
        return None, f"VideoMAE weights {name!r} not found locally ({str(exc).splitlines()[0][:160]})"
    return (model, processor), None


@torch.no_grad()
def videomae_probs(model, processor, videos: np.ndarray, device: str) -> np.ndarray:
    """(n, classes) softmax of the classifier on each video, frames resampled to its ``num_frames``."""
    idx = np.linspace(0, videos.shape[1] - 1, model.config.num_frames).round().astype(int)
    out = []
    for video in videos:
        inputs = processor(list(video[idx]), return_tensors="pt")
        logits = model(pixel_values=inputs["pixel_values"].to(device)).logits
        out.append(torch.softmax(logits.float(), -1)[0].cpu().numpy())
    return np.stack(out)


def n_way_scores(gt: np.ndarray, rec: np.ndarray, n_ways: Sequence[int], trials: int, seed: int,
                 per_clip: intervals.PerImage | None = None) -> dict[str, float]:
    """CLIP-feature n-way identification at video and frame level, named by the n used; ``per_clip``
    receives their failure matrices for the bootstrap (:mod:`.intervals`)."""
    out = {}
    m, f = gt.shape[:2]
    for n in n_ways:
        n_used = min(int(n), m)
        out[f"CLIP {n_used}-way (video)"] = n_way_identification(gt.mean(1), rec.mean(1), n_used, trials, seed)
        out[f"CLIP {n_used}-way (frame)"] = float(np.mean(
            [n_way_identification(gt[:, j], rec[:, j], n_used, trials, seed + j) for j in range(f)]))
        if per_clip is not None:
            per_clip[f"CLIP {n_used}-way (video)"] = {"fail": two_way_failures(gt.mean(1), rec.mean(1)), "pool": n_used}
            per_clip[f"CLIP {n_used}-way (frame)"] = {
                "fail": np.stack([two_way_failures(gt[:, j], rec[:, j]) for j in range(f)]), "pool": n_used}
    return out


def videomae_scores(p_gt: np.ndarray, p_rec: np.ndarray, n: int) -> np.ndarray:
    """(clips,) probability that a clip passes :func:`n_way_top1_classification` over random class draws."""
    truth = p_gt.argmax(1)
    own = p_rec[np.arange(len(truth)), truth]
    fails = (p_rec >= own[:, None]).sum(1) - 1.0  # other classes scoring at least the true class (ties fail)
    return bootstrap.no_fail_probability(np.full(len(truth), p_gt.shape[1] - 1.0), fails, n)


def evaluate_video_run(
    run: Path | str, *, video: Path | str | None = None, videomae: str | None = VIDEOMAE, device: str = "auto",
    n_ways: Sequence[int] = (2, 50), trials: int = 100, seed: int = 0,
) -> dict[str, Any]:
    """Metrics of a decode-video folder -> ``<run>/metrics.json``; see the module docstring."""
    device = str(resolve_device(device))
    run = Path(run)
    info_path = run / "decode.json"
    if not info_path.is_file():
        raise UserError(f"{run}: no decode.json; run decode-video first")
    info = json.loads(info_path.read_text())
    ids = np.asarray(info["clip_ids"], np.int64)
    if len(ids) < 2:
        raise UserError(f"{run}: need at least 2 test clips to evaluate, got {len(ids)}")
    store = open_cache(info["clip"], rows=ids)
    rec = read_clips(run / "recon_video", ids, info["frames_per_clip"])
    if rec.shape[2] != rec.shape[3]:
        raise UserError(f"{run}/recon_video: frames are {rec.shape[3]}x{rec.shape[2]}, not square")
    gt = ground_truth(store, ids, rec.shape[2], video)
    flat_gt, flat_rec = gt.reshape(-1, *gt.shape[2:]), rec.reshape(-1, *rec.shape[2:])
    ssim_frames, psnr_frames = ssim_each(flat_gt, flat_rec), np.minimum(psnr_each(flat_gt, flat_rec), 100.0)
    numbers: dict[str, float] = {"SSIM": float(ssim_frames.mean()), "PSNR": float(np.mean(psnr_frames))}
    per_clip: intervals.PerImage = {"SSIM": {"scores": ssim_frames.reshape(len(ids), -1).mean(1)},
                                    "PSNR": {"scores": psnr_frames.reshape(len(ids), -1).mean(1)}}
    unavailable: dict[str, str] = {}
    reference: dict[str, float] = {}
    try:
        loaded = load_cache_model(store.attrs, device)
    except UserError as exc:  # the config file or checkpoint moved, weights not on this machine
        names = ["CLIP-pcc", *(f"CLIP {min(int(n), len(ids))}-way ({level})"
                               for n in n_ways for level in ("video", "frame"))]
        unavailable.update(dict.fromkeys(names, f"the cache's CLIP model cannot be rebuilt: {exc}"))
    else:
        f_gt, f_rec = frame_features(loaded, gt, device), frame_features(loaded, rec, device)
        numbers["CLIP-pcc"] = clip_pcc(f_rec)
        per_clip["CLIP-pcc"] = {"scores": np.array([clip_pcc(f_rec[k : k + 1]) for k in range(len(ids))])}
        numbers.update(n_way_scores(f_gt, f_rec, n_ways, trials, seed, per_clip))
        reference["CLIP-pcc of the ground truth"] = clip_pcc(f_gt)
    found, reason = load_videomae(videomae, device) if videomae else (None, "no VideoMAE model given")
    if found is None:
        for n in n_ways:
            unavailable[f"VideoMAE {n}-way"] = reason
    else:
        model, processor = found
        p_gt, p_rec = videomae_probs(model, processor, gt, device), videomae_probs(model, processor, rec, device)
        for n in n_ways:
            n_used = min(int(n), p_gt.shape[1])
            numbers[f"VideoMAE {n_used}-way"] = n_way_top1_classification(p_gt, p_rec, n_used, trials, seed)
            per_clip[f"VideoMAE {n_used}-way"] = {"scores": videomae_scores(p_gt, p_rec, n_used)}
    ci95, record = intervals.clip_intervals(per_clip, len(ids))
    out = {
        "method": info.get("method"),
        "n_clips": int(len(ids)),
        "frames_per_clip": info["frames_per_clip"],
        "size": int(rec.shape[2]),
        "reconstruction": numbers,
        "ci95": {"reconstruction": ci95},
        "bootstrap": record,
        "reference": reference,
        "protocol": {
            "clip_model": f"{store.attrs.get('model_source') or store.attrs['model']} / {store.attrs['pretrained']} "
                          "(the run's cache model)",
            "n_way": f"{trials} draws of n - 1 distractors per clip, seed {seed}; chance = 1 / n",
            "ground_truth": "the test clips' frames from their mp4s at the cache's frame times, centre square",
            "psnr": "data range 1, capped at 100 dB for identical frames",
        },
        "unavailable": unavailable,
    }
    intervals.write_per_image(run / "per_clip.npz", intervals.flatten({None: per_clip}, {None: ids}))
    write_text(run / "metrics.json", json.dumps(out, indent=2))
    return out
