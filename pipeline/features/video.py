"""extract-clip --video: movie clips -> the features cache, one row per (segment, TR) clip.

The cache has the layout of :mod:`.cache` (same shards, resume, ``shard_done``, settings check),
with rows = clip ids of :mod:`pipeline.data.cc2017` (training segments first, then test segments,
``trs_per_segment`` clips each) instead of 73k image ids:

- ``layers/<name>`` (N, T, C) float16 and ``image_embeds`` (N, D) float32: the clip's *keyframe*
  (frame ``keyframe`` of its frames, 1-based; default the middle one, 3 of 6 at 3 fps: NeuroClips
  trains on frame 3 or 4 and tests on frame 3) through the same :func:`clip.encode_layers`;
- ``frame_embeds`` (N, F, D) float32: ``encode_image`` of every frame (F = fps x TR = 6);
- ``frames`` (N, F, S, S, 3) uint8: the frames at ``frame_size`` (centre square, bicubic; 64 px by
  default): the perception branch's blurry-video target and the keyframe pool of retrieval;
- ``frame_latents`` (N, F, 4, S/8, S/8) float16, with ``--vae``: the SD VAE's latents of the frames
  (``latent_dist.mode() * scaling_factor``, NeuroClips' perception target; it used 224 px frames,
  i.e. 28 x 28 latents: ``--frame-size 224``).

Frame j of clip t of a segment is the frame shown at t * TR + j / fps seconds of its mp4
(:func:`pipeline.videoio.read_frames`). Batches are ``batch_size`` clips (F times as many frames).
Default ``shard_rows`` is one segment per shard (240 clips: 23 shards for cc2017).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import hub
from ..data.cc2017 import CC2017, Design
from ..errors import UserError
from ..videoio import probe, read_frames, square
from . import clip
from .cache import ArraySpec, default_chunk_rows, n_shards, store_layout
from .shards import fill_store, layer_outputs, model_attrs, model_settings, setup, versions
from .spec import ClipSpec, Execution, with_defaults, with_options

VAE_SCALE = 8
"""Spatial downsampling of the SD VAE (4 levels)."""
BATCH_SIZE = 16
"""Clips per forward pass (x frames per clip) unless :class:`Execution` says otherwise."""


@dataclass(frozen=True)
class VideoSpec:
    """What a video store holds beyond :class:`ClipSpec`: the frames kept per clip and their sizes.
    ``keyframe`` is 1-based (None: the middle frame); ``vae`` also caches the frames' latents."""

    fps: float = 3.0
    keyframe: int | None = None
    frame_size: int = 64
    vae: str | None = None


def frames_per_clip(fps: float, tr: float) -> int:
    """fps x TR frames per clip; a rate that does not divide the TR into whole frames is refused."""
    per = float(fps) * float(tr)
    if not fps > 0 or abs(per - round(per)) > 1e-6 or round(per) < 1:
        raise UserError(f"--fps {fps} does not divide the TR: fps x TR ({tr} s) must be a whole number of frames "
                        "per clip (e.g. --fps 3 -> 6 frames)")
    return int(round(per))


def clip_times(t: np.ndarray, fps: float, tr: float, per_clip: int) -> np.ndarray:
    """(n, F) seconds into its segment of each frame of clips ``t`` (TR indices within the segment)."""
    return np.asarray(t, np.float64)[:, None] * tr + np.arange(per_clip)[None, :] / fps


# ---- the VAE (perception targets in latent space) --------------------------------------------------
@functools.lru_cache(maxsize=2)
def load_vae(model: str, device: str = "cpu"):
    """A diffusers ``AutoencoderKL``: a VAE folder / hub id, or a pipeline's ``vae/`` subfolder."""
    cls = hub.diffusers_module().AutoencoderKL
    name, local = hub.locate(model, "--vae", markers=("config.json", "vae/config.json"))
    opts = hub.options()
    error = None
    for sub in ({}, {"subfolder": "vae"}):
        try:
            config = hub.read_config(cls, name, local, "--vae", opts, file="config.json", **sub)
        except UserError as exc:
            error = error or exc
            continue
        if config.get("_class_name") == cls.__name__:
            return hub.load(cls, name, "--vae", opts, low_cpu_mem_usage=False, **sub).to(device).eval()
        error = UserError(f"--vae {name!r}: holds a {config.get('_class_name')}, not an {cls.__name__}")
    raise error


def vae_encode(vae, frames: torch.Tensor) -> torch.Tensor:
    """(n, S, S, 3) uint8 frames -> (n, C, S/8, S/8) latents, ``mode() * scaling_factor``."""
    x = frames.permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1
    return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor


# ---- reading clips ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoSource:
    """Movie clips of a cc2017 stimuli folder (plain values: it travels to dask workers)."""

    stimuli: str
    segments: tuple[tuple[str, int, int], ...]  # (name, first clip id, clips)
    tr: float
    fps: float
    keyframe: int  # 0-based
    frame_size: int
    vae: str | None

    @property
    def per_clip(self) -> int:
        return frames_per_clip(self.fps, self.tr)

    def clip_frames(self, a: int, b: int, size: int | None = None) -> np.ndarray:
        """(b - a, F, H, W, 3) uint8 frames of clips a..b-1 (full size, or :func:`square` of ``size``)."""
        parts = []
        for name, first, n in self.segments:
            lo, hi = max(a, first), min(b, first + n)
            if lo < hi:
                times = clip_times(np.arange(lo - first, hi - first), self.fps, self.tr, self.per_clip)
                frames = read_frames(Path(self.stimuli) / f"{name}.mp4", times.ravel(), size)
                parts.append(frames.reshape(hi - lo, self.per_clip, *frames.shape[1:]))
        return np.concatenate(parts)

    def dataset(self, spans: list[tuple[int, int, int]], transform) -> torch.utils.data.Dataset:
        return _ClipBatches(self, spans, transform)

    def encode(self, loaded: clip.LoadedModel, inputs: dict[str, torch.Tensor], layers: list[clip.LayerSpec],
               tokens: clip.TokenMode, device: str) -> dict[str, torch.Tensor]:
        pixels = inputs["pixels"].to(device, non_blocking=True)  # (B, F, 3, H, W)
        b, f = pixels.shape[:2]
        toks, embeds = clip.encode_layers(loaded, pixels[:, self.keyframe], layers, tokens)
        out = layer_outputs(toks)
        out["image_embeds"] = embeds.float()
        others = [j for j in range(f) if j != self.keyframe]
        frame_embeds = torch.empty(b, f, embeds.shape[-1], device=embeds.device)
        frame_embeds[:, self.keyframe] = embeds.float()
        if others:
            rest = loaded.model.encode_image(pixels[:, others].flatten(0, 1))
            frame_embeds[:, others] = rest.float().view(b, len(others), -1)
        out["frame_embeds"] = frame_embeds
        out["frames"] = inputs["frames"]
        if self.vae is not None:
            small = inputs["frames"].flatten(0, 1)
            latents = vae_encode(load_vae(self.vae, device), small)
            out["frame_latents"] = latents.to(torch.float16).view(b, f, *latents.shape[1:])
        return out


class _ClipBatches(torch.utils.data.Dataset):
    """Item i = batch i: the CLIP inputs (B, F, 3, H, W) and the small frames (B, F, S, S, 3) uint8."""

    def __init__(self, source: VideoSource, spans: list[tuple[int, int, int]], transform) -> None:
        self.source, self.spans, self.transform = source, spans, transform

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> tuple[int, dict[str, torch.Tensor]]:
        _, a, b = self.spans[i]
        frames = self.source.clip_frames(a, b)
        flat = frames.reshape(-1, *frames.shape[2:])
        pixels = clip.preprocess_images(self.transform, flat)
        small = np.stack([square(img, self.source.frame_size) for img in flat])
        return i, {"pixels": pixels.view(*frames.shape[:2], *pixels.shape[1:]),
                   "frames": torch.from_numpy(small.reshape(*frames.shape[:2], *small.shape[1:]))}


# ---- the driver ------------------------------------------------------------------------------------
def describe_videos(data: CC2017, fps: float) -> dict:
    """Size, header facts and a content fingerprint (sha256 of the first and last 64 KiB) of every
    segment's mp4, checked to be long enough for its clips and at least ``fps`` frames per second."""
    need = data.design.trs_per_segment * data.design.tr
    out = {}
    for seg in data.design.segments:
        path = data.video_path(seg)
        info = probe(path)
        if info.duration + 1e-3 < need:
            raise UserError(f"{path}: the video lasts {info.duration:.2f} s but its fMRI covers {need:.0f} s "
                            f"({data.design.trs_per_segment} TRs of {data.design.tr} s); is it shorter than its fMRI?")
        if info.fps and info.fps + 1e-6 < fps:
            raise UserError(f"--fps {fps} is above the {info.fps:g} fps of {path}")
        size = path.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            h.update(f.read())
        out[seg.name] = {"size": size, "fps": info.fps, "duration": info.duration,
                         "frame_size": [info.width, info.height], "fingerprint": h.hexdigest()}
    return out


def video_layout(base: dict[str, ArraySpec], n: int, per_clip: int, frame_size: int, embed_dim: int,
                 shard_rows: int, latent_channels: int | None) -> dict[str, ArraySpec]:
    """The store layout of :func:`store_layout` plus the per-frame arrays."""
    layout = dict(base)
    layout["frame_embeds"] = ArraySpec((n, per_clip, embed_dim), "float32", shard_rows, shard_rows)
    shape = (per_clip, frame_size, frame_size, 3)
    layout["frames"] = ArraySpec((n, *shape), "uint8", default_chunk_rows(int(np.prod(shape)), shard_rows), shard_rows)
    if latent_channels is not None:
        side = frame_size // VAE_SCALE
        lat = (per_clip, latent_channels, side, side)
        layout["frame_latents"] = ArraySpec((n, *lat), "float16",
                                            default_chunk_rows(int(np.prod(lat)) * 2, shard_rows), shard_rows)
    return layout


def extract_video(
    root: Path | str,
    out: Path | str,
    spec: ClipSpec = ClipSpec(),
    run: Execution = Execution(),
    *,
    video: VideoSpec = VideoSpec(),
    design: Design = Design(),
    overwrite: bool = False,
    report=lambda line: None,
    **options,
) -> Path:
    """Fill (or resume) the video features cache at ``out`` from the movies under ``root`` (a cc2017
    root or its ``stimuli/`` folder); see the module docstring. ``run.batch_size`` counts clips;
    ``options``: fields of ``spec``, ``run`` or ``video`` by name, as in
    :func:`pipeline.features.extract.extract_clip`."""
    out = Path(out)
    spec, run, video = with_options((spec, run, video), options)
    fps, frame_size, vae = video.fps, video.frame_size, video.vae
    per_clip = frames_per_clip(fps, design.tr)
    keyframe = (per_clip + 1) // 2 if video.keyframe is None else int(video.keyframe)
    if not 1 <= keyframe <= per_clip:
        raise UserError(f"--keyframe {keyframe}: clips have frames 1..{per_clip} at {fps:g} fps")
    if frame_size < 8 or frame_size % 2 or (vae is not None and frame_size % VAE_SCALE):
        raise UserError(f"--frame-size {frame_size}: must be even and >= 8 (a multiple of {VAE_SCALE} with --vae)")
    data = CC2017(root, design)
    data.check_videos()
    videos = describe_videos(data, fps)
    st = setup(*with_defaults(spec, run, shard_rows=design.trs_per_segment, batch_size=BATCH_SIZE))
    shard_rows = st.spec.shard_rows
    latent_channels = None
    if vae is not None:
        latent_channels = int(load_vae(str(vae), "cpu").config.latent_channels)
    n = design.n_clips
    base = store_layout(st.loaded, st.layers, st.tokens, n, shard_rows, spec.chunk_rows, captions=False)
    layout = video_layout(base, n, per_clip, frame_size, st.loaded.embed_dim, shard_rows, latent_channels)
    record = {"fps": float(fps), "tr": design.tr, "frames_per_clip": per_clip, "keyframe": keyframe,
              "frame_size": frame_size, "vae": str(vae) if vae is not None else None,
              "clip_layout": design.clip_layout()}
    settings = {**model_settings(st, layout), "video": record,
                "source": {name: {k: v[k] for k in ("size", "fingerprint")} for name, v in videos.items()}}
    attrs = {
        "settings": settings,
        **model_attrs(st, layout),
        "dataset": "cc2017",
        "video": {**record, "frame_convention": "frame j of clip t = the frame shown at t * tr + j / fps s into the "
                  "segment; frames are the centre square, bicubic; keyframe is 1-based",
                  "design": design.as_dict()},
        "clip_layout": design.clip_layout(),
        "source": {"stimuli": str(data.stimuli_dir), "videos": videos},  # as given, as for NSD stores
        "N": n,
        "versions": versions(),
    }
    source = VideoSource(str(data.stimuli_dir), tuple((s.name, s.first_clip, s.n_clips) for s in design.segments),
                         design.tr, float(fps), keyframe - 1, frame_size, None if vae is None else str(vae))
    requested = list(range(n_shards(n, shard_rows)))
    return fill_store(out, st, source, layout, settings, attrs, requested, overwrite=overwrite, report=report,
                      noun="clips")
