"""Videos from predicted keyframe embeddings and blurry frames: NeuroClips' last stage, two ways.

Inputs per test clip: a *keyframe* (the semantics branch: :func:`retrieval_keyframes`, the nearest
training clip's keyframe by predicted ``image_embeds``, no weights; or unCLIP through
:func:`pipeline.decoding.decode.unclip_decode`, as for images) and F *blurry frames* (the
perception branch's predicted ``frames``, or ``frame_latents`` decoded by the cache's VAE).

- ``interpolate`` (no weights, the baseline): :func:`interpolate` warps the keyframe along the
  blurry frames' motion (the translation of each blurry frame relative to the blurry frame at the
  keyframe's position, by phase correlation) and replaces the warped keyframe's low spatial
  frequencies with the blurry frame's: detail and semantics from the keyframe, colour, layout and
  motion from the perception branch.
- ``diffusion``: an AnimateDiff video-to-video pipeline (diffusers ``AnimateDiffVideoToVideoPipeline``:
  a Stable Diffusion 1.5 folder or hub id plus a ``MotionAdapter``, or a saved pipeline folder)
  denoises the ``interpolate`` video from ``strength``: the keyframe and the blurry frames guide it
  through its initial latents. NeuroClips instead uses AnimateDiff with SparseCtrl (the keyframe as
  a first-frame RGB condition), the blurry video's latents as the start and a BLIP-2 caption of the
  keyframe as the prompt; here the prompt is ``prompt`` (empty by default) and there is no
  SparseCtrl branch. Each clip has its own generator seeded from (seed, clip id), so a clip's video
  does not depend on which other clips are decoded. On a terminal a bar counts the clips and the
  pipeline's own bar the denoising steps (:func:`pipeline.decoding.decode.decoding_bars`).

Output (:func:`write_clip`): ``<clip id, 5 digits>.mp4`` at the clips' frame rate (F frames =
one TR) and ``<clip id>.png``, a contact sheet of the F frames side by side with no gaps, which
is what evaluate-video reads (lossless; the mp4 is H.264). :func:`write_video_grid` draws ground
truth above reconstruction for a few clips.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import hub
from ..errors import UserError
from ..store import take_rows
from ..videoio import square, write_mp4
from .decode import decoding_bars, nearest_rows, sample_generator, to_uint8

ID_WIDTH = 5


# ---- keyframes and blurry frames ------------------------------------------------------------------------
def retrieval_keyframes(pred: np.ndarray, bank, frames, keyframe: int, exclude: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keyframes (n, S, S, 3) of the cached clips nearest (cosine) to predicted ``image_embeds``,
    never one of ``exclude``, and their clip ids; ``keyframe`` is 0-based."""
    rows = nearest_rows(pred, bank, exclude=exclude)[0][:, 0]
    return take_rows(frames, rows)[:, keyframe], rows


def blurry_frames(pred: np.ndarray, target: str, vae=None) -> np.ndarray:
    """The perception branch's (n, F, S, S, 3) uint8 frames: predicted ``frames`` rounded, or
    predicted ``frame_latents`` (n, F, C, h, w) through the VAE decoder."""
    if target == "frames":
        return np.clip(np.rint(pred), 0, 255).astype(np.uint8)
    if vae is None:
        raise UserError(f"decoding predicted {target} needs the VAE the cache was made with (its --vae)")
    n, f = pred.shape[:2]
    out = []
    with torch.no_grad():
        for lat in torch.from_numpy(np.asarray(pred, np.float32)).flatten(0, 1).split(32):
            x = vae.decode(lat.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
            out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    frames = np.concatenate(out)
    return frames.reshape(n, f, *frames.shape[1:])


# ---- interpolate ---------------------------------------------------------------------------------------
def _gray(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def frame_shifts(blurry: np.ndarray, key: int) -> np.ndarray:
    """(F, 2) (dy, dx) pixel translation of each frame relative to frame ``key`` (phase correlation)."""
    from skimage.registration import phase_cross_correlation

    ref = _gray(blurry[key])
    shifts = np.zeros((len(blurry), 2))
    for f, frame in enumerate(blurry):
        if f != key and ref.std() > 0 and _gray(frame).std() > 0:
            shift, _, _ = phase_cross_correlation(_gray(frame), ref, upsample_factor=4, normalization=None)
            shifts[f] = shift
    return shifts


def interpolate(keyframe: np.ndarray, blurry: np.ndarray, key: int, size: int, sigma: float | None = None) -> np.ndarray:
    """(F, size, size, 3) uint8: the keyframe translated along the blurry frames' motion, with its
    low frequencies (Gaussian, ``sigma`` px, default size / 16) replaced by the blurry frame's."""
    from scipy.ndimage import gaussian_filter, shift

    sigma = size / 16 if sigma is None else sigma
    key_img = square(to_uint8(keyframe[None])[0], size).astype(np.float64)
    blur = np.stack([square(b, size) for b in blurry]).astype(np.float64)
    scale = size / blurry.shape[1]

    def low(img: np.ndarray) -> np.ndarray:
        return gaussian_filter(img, (sigma, sigma, 0), mode="nearest")

    out = np.empty(blur.shape, np.uint8)
    for f, (dy, dx) in enumerate(frame_shifts(blurry, key) * scale):
        warped = shift(key_img, (dy, dx, 0), order=1, mode="nearest")
        out[f] = np.clip(np.rint(warped - low(warped) + low(blur[f])), 0, 255).astype(np.uint8)
    return out


# ---- diffusion -----------------------------------------------------------------------------------------
def load_animatediff(model: str | Path, motion_adapter: str | Path | None = None, device: str = "cpu",
                     dtype: torch.dtype | None = None, local_files_only: bool = False, cache_dir: Path | str | None = None):
    """An ``AnimateDiffVideoToVideoPipeline``: a saved pipeline folder / hub id, or a Stable Diffusion
    1.x pipeline plus ``motion_adapter`` (a ``MotionAdapter`` folder or hub id, e.g.
    ``guoyww/animatediff-motion-adapter-v1-5-2``). Offline-safe, one-line errors (:mod:`pipeline.hub`)."""
    diffusers = hub.diffusers_module()
    cls = diffusers.AnimateDiffVideoToVideoPipeline
    name, local = hub.locate(model, "video model")
    opts = hub.options(local_files_only, cache_dir)
    config = hub.read_config(cls, name, local, "video model", opts)
    dtype = hub.default_dtype(device, dtype)
    extra = {}
    if config.get("_class_name") != cls.__name__:
        if motion_adapter is None:
            raise UserError(f"video model {name!r} is a {config.get('_class_name')}; give motion_adapter (a MotionAdapter "
                            "folder or hub id) to animate it, or a saved AnimateDiffVideoToVideoPipeline folder")
        adapter_name, adapter_local = hub.locate(motion_adapter, "motion adapter", markers=("config.json",))
        hub.read_config(diffusers.MotionAdapter, adapter_name, adapter_local, "motion adapter", opts, file="config.json")
        extra["motion_adapter"] = hub.load(diffusers.MotionAdapter, adapter_name, "motion adapter", opts,
                                           dtype=dtype, low_cpu_mem_usage=False)
        skip = {k: None for k, v in config.items() if isinstance(v, list) and v and v[0] is None}
        extra.update(skip, safety_checker=None, feature_extractor=None, image_encoder=None)
    pipe = hub.load(cls, name, "video model", opts, dtype=dtype, low_cpu_mem_usage=False, **extra)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusion_decode(pipe, init: np.ndarray, clip_ids: Sequence[int], *, steps: int = 25, strength: float = 0.6,
                     guidance: float = 7.5, prompt: str = "", seed: int = 0,
                     show_progress: bool | None = None) -> np.ndarray:
    """(n, F, S, S, 3) uint8 videos denoised by ``pipe`` from the ``init`` videos (n, F, S, S, 3) at
    ``strength``; ``show_progress``: bars per clip and per step (default: on a terminal only)."""
    init = np.asarray(init)
    if init.ndim != 5 or init.shape[-1] != 3 or len(init) != len(clip_ids):
        raise UserError(f"diffusion: expected ({len(clip_ids)}, frames, S, S, 3) init videos, got {init.shape}")
    size = init.shape[2]
    if size % pipe.vae_scale_factor:
        raise UserError(f"diffusion: the video size {size} must be a multiple of {pipe.vae_scale_factor}")
    if not 0 < strength <= 1 or int(steps * strength) < 1:
        raise UserError(f"diffusion strength must be in (0, 1] with steps x strength >= 1, not {strength} x {steps}")
    if pipe.tokenizer is None or pipe.text_encoder is None:
        raise UserError("the video model has no tokenizer/text encoder to encode the prompt with")
    out = []
    with decoding_bars(pipe, show_progress, len(init), "animatediff", "clip") as bar:
        for video, clip_id in zip(init, clip_ids):
            frames = pipe(
                video=[[Image.fromarray(f) for f in video]], prompt=prompt, height=size, width=size,
                num_inference_steps=steps, strength=strength, guidance_scale=guidance, output_type="np",
                generator=sample_generator(seed, int(clip_id), 0),
            ).frames
            out.append(to_uint8(np.asarray(frames)[0]))
            bar.update(1)
    return np.stack(out)


# ---- output ---------------------------------------------------------------------------------------------
def clip_name(clip_id: int, suffix: str) -> str:
    return f"{int(clip_id):0{ID_WIDTH}d}{suffix}"


def contact_sheet(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) -> (H, F * W, 3): the frames side by side, no gaps."""
    return np.concatenate(list(frames), axis=1)


def write_clip(folder: Path, clip_id: int, frames: np.ndarray, fps: float) -> None:
    """``<id>.mp4`` (H.264 at ``fps``) and ``<id>.png`` (contact sheet) of one reconstructed clip."""
    write_mp4(folder / clip_name(clip_id, ".mp4"), frames, fps)
    Image.fromarray(contact_sheet(frames)).save(folder / clip_name(clip_id, ".png"))


def read_clips(folder: Path | str, clip_ids: Sequence[int], n_frames: int) -> np.ndarray:
    """(n, F, H, W, 3) uint8 reconstructions from their contact sheets."""
    folder = Path(folder)
    out = []
    for clip_id in clip_ids:
        path = folder / clip_name(clip_id, ".png")
        if not path.is_file():
            raise UserError(f"reconstruction of clip {int(clip_id)} not found: {path}")
        sheet = np.asarray(Image.open(path).convert("RGB"))
        if sheet.shape[1] % n_frames:
            raise UserError(f"{path}: {sheet.shape[1]} px wide, not {n_frames} frames side by side")
        out.append(np.stack(np.split(sheet, n_frames, axis=1)))
    if len({v.shape for v in out}) > 1:
        raise UserError(f"reconstructions in {folder} differ in size; decode them again")
    return np.stack(out)


def write_video_grid(path: Path | str, gt: np.ndarray, rec: np.ndarray, clips: int = 6, tile: int = 64) -> Path:
    """A PNG with, for up to ``clips`` clips, a row of ground-truth frames above a row of reconstructed ones."""
    gt, rec = np.asarray(gt)[:clips], np.asarray(rec)[:clips]
    if gt.shape[:2] != rec.shape[:2] or not len(gt):
        raise UserError(f"video grid: ground truth {gt.shape[:2]} and reconstructions {rec.shape[:2]} do not pair up")
    n, f = gt.shape[:2]
    gap = max(tile // 16, 1)
    canvas = Image.new("RGB", (f * (tile + gap) + gap, n * (2 * tile + 3 * gap) + gap), "white")
    for i in range(n):
        for j in range(f):
            x, y = gap + j * (tile + gap), gap + i * (2 * tile + 3 * gap)
            canvas.paste(Image.fromarray(gt[i, j]).resize((tile, tile), Image.BILINEAR), (x, y))
            canvas.paste(Image.fromarray(rec[i, j]).resize((tile, tile), Image.BILINEAR), (x, y + tile + gap))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
