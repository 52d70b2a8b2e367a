"""make-demo-video: a miniature cc2017 look-alike with a planted encoding model of keyframes and motion.

Same layout, file formats and conventions as the real release (:mod:`pipeline.data.cc2017`): H.264 mp4 movie
segments in ``stimuli/``, CIFTI-2 dense time series (``BrainModelAxis`` + ``SeriesAxis``, intent
ConnDenseSeries) per subject, segment and repetition, with the volume counts of the real runs
(training and test1: the kept window plus 1 leading and 4 trailing volumes; test2.. : 2 leading),
and cortical surface grayordinates followed by a subcortical volume model that readers must skip.
Only the sizes are smaller (:data:`DEMO_DESIGN`; mirrored in params.yaml ``cc2017_design``).

The movies are scenes of one coloured shape moving on a plain background (a new scene every
2-5 TRs, like cuts). The fMRI is generated per TR (clip) from:

- keyframe voxels: a random linear read-out of the CLIP ``image_embeds`` of the clip's keyframe
  (frame ``keyframe`` of its frames at ``fps``), computed with the demo's tiny open_clip ViT
  (random weights, saved beside the data as the demo's "pretrained" model);
- motion voxels: a read-out of the scene's velocity (vx, vy) and speed during the clip;
- other grayordinates: noise only;

each convolved with a gamma HRF peaking at 4 s (so the right ``--lag`` is 2 TRs), plus per-run
offset and gain, a cubic drift (so detrending matters) and independent noise per repetition (so
reproducibility selects the planted voxels). ``demo/planted.npz`` holds the voxel groups and
weights, and the per-clip signals (``keyframe_signal`` @ ``w_keyframe`` is a keyframe voxel's drive
before the HRF). ``demo/tiny-animatediff`` is an AnimateDiff video-to-video pipeline folder of tiny random
components (the real classes and configs' shape), so the diffusion decoder runs on the demo; its
outputs carry no meaning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.stats
import torch
from nibabel import cifti2
from safetensors.torch import save_file

from ..data.cc2017 import CC2017, Design
from ..features import clip
from ..videoio import write_mp4
from .nsd import COLOURS

DEMO_DESIGN = Design(train_segments=8, test_segments=2, train_repeats=2, test_repeats=10, tr=2.0,
                     trs_per_segment=25, trailing_volumes=4, cortex_grayordinates=300)
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
EMBED = 32  # cross-attention width of the tiny diffusion components = the tiny CLIP's embed_dim


@dataclass(frozen=True)
class DemoVideoConfig:
    """Sizes of the look-alike; the defaults run the whole video demo in well under a minute on 2 cores."""

    design: Design = DEMO_DESIGN
    subjects: int = 2
    size: int = 64  # movie frame size (px)
    native_fps: float = 15.0  # the real movies are 30 fps
    fps: float = 3.0  # the frame rate the keyframe is taken at (as extract-clip --fps)
    keyframe: int = 3  # 1-based frame of each clip's fps * tr frames that carries the keyframe features
    hemisphere_vertices: tuple[int, int] = (180, 170)  # surface sizes; cortex_grayordinates of them are used
    subcortical: int = 16
    keyframe_fraction: float = 0.3
    motion_fraction: float = 0.2
    noise: float = 0.4  # per-run noise sd, relative to a unit-variance planted response
    drift: float = 1.0  # sd of the cubic drift's coefficients
    model: str = "nsd-tiny-vit"
    seed: int = 0


# ---- movies ---------------------------------------------------------------------------------------
def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    return {
        "circle": dx**2 + dy**2 < r**2,
        "square": (abs(dx) < r) & (abs(dy) < r),
        "triangle": (dy < r) & (dy > -r) & (abs(dx) < (dy + r) / 2),
        "cross": ((abs(dx) < r / 3) & (abs(dy) < r)) | ((abs(dy) < r / 3) & (abs(dx) < r)),
        "ring": (dx**2 + dy**2 < r**2) & (dx**2 + dy**2 > (0.6 * r) ** 2),
        "diamond": abs(dx) + abs(dy) < r,
    }[shape]


def make_scenes(n_clips: int, rng: np.random.Generator) -> list[dict]:
    """Scenes covering ``n_clips`` TRs: shape, colours, start position and velocity (image widths / s)."""
    names, scenes, t = list(COLOURS), [], 0
    while t < n_clips:
        length = int(min(rng.integers(2, 6), n_clips - t))
        fg, bg = rng.choice(names, 2, replace=False)
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.02, 0.12)
        scenes.append({"start": t, "length": length, "shape": str(rng.choice(SHAPES)), "fg": str(fg), "bg": str(bg),
                       "x0": float(rng.uniform(0.3, 0.7)), "y0": float(rng.uniform(0.3, 0.7)),
                       "r": float(rng.uniform(0.12, 0.22)), "vx": float(speed * np.cos(angle)),
                       "vy": float(speed * np.sin(angle))})
        t += length
    return scenes


def _bounce(p: np.ndarray) -> np.ndarray:
    """Positions reflected into [0.15, 0.85] (the shape bounces off the frame's edges)."""
    lo, hi = 0.15, 0.85
    q = np.mod(p - lo, 2 * (hi - lo))
    return lo + np.where(q > hi - lo, 2 * (hi - lo) - q, q)


def render(scenes: list[dict], cfg: DemoVideoConfig, rng: np.random.Generator) -> np.ndarray:
    """The movie (n_frames, size, size, 3) uint8 at ``native_fps``, exactly n_clips * tr seconds."""
    tr, size = cfg.design.tr, cfg.size
    n_frames = int(round(scenes[-1]["start"] * tr * cfg.native_fps + scenes[-1]["length"] * tr * cfg.native_fps))
    yy, xx = np.mgrid[0:size, 0:size] / size
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    grain = rng.normal(0, 3, (size, size, 3))  # a fixed film grain, so frames are not flat colour
    for sc in scenes:
        first = int(round(sc["start"] * tr * cfg.native_fps))
        last = int(round((sc["start"] + sc["length"]) * tr * cfg.native_fps))
        for f in range(first, last):
            s = f / cfg.native_fps - sc["start"] * tr
            cx, cy = _bounce(np.array([sc["x0"] + sc["vx"] * s, sc["y0"] + sc["vy"] * s]))
            img = np.empty((size, size, 3), np.float64)
            img[:] = COLOURS[sc["bg"]]
            img[_mask(sc["shape"], xx - cx, yy - cy, sc["r"])] = COLOURS[sc["fg"]]
            img += grain
            frames[f] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def motion_features(scenes: list[dict], n_clips: int) -> np.ndarray:
    """(n_clips, 3): the scene's vx, vy and speed during each clip."""
    out = np.zeros((n_clips, 3))
    for sc in scenes:
        out[sc["start"] : sc["start"] + sc["length"]] = [sc["vx"], sc["vy"], np.hypot(sc["vx"], sc["vy"])]
    return out


# ---- the planted response ---------------------------------------------------------------------------
def hrf(tr: float, length: float = 24.0) -> np.ndarray:
    """A gamma-difference HRF peaking at 4 s (undershoot at 11 s), sampled every ``tr``, unit peak."""
    t = np.arange(0, length, tr)
    h = scipy.stats.gamma.pdf(t, 5) - scipy.stats.gamma.pdf(t, 12) / 6
    return h / h.max()


def keyframe_embeds(cfg: DemoVideoConfig, keyframes: np.ndarray, weights: Path) -> np.ndarray:
    """``encode_image`` of every clip's keyframe with the demo's tiny ViT, z-scored per dimension."""
    loaded = clip.load_model(cfg.model, str(weights))
    parts = []
    with torch.no_grad():
        for start in range(0, len(keyframes), 64):
            parts.append(loaded.model.encode_image(clip.preprocess_batch(loaded, keyframes[start : start + 64])).numpy())
    e = np.concatenate(parts)
    return (e - e.mean(0)) / (e.std(0) + 1e-8)


def _readout(feats: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    w = rng.normal(size=(feats.shape[1], n))
    sig = feats @ w
    return sig / sig.std(0), w / sig.std(0)


def brain_models(cfg: DemoVideoConfig, rng: np.random.Generator) -> cifti2.BrainModelAxis:
    """Left and right cortical surface models (``cortex_grayordinates`` vertices in all) and a small
    subcortical volume model after them, as in HCP's grayordinate order."""
    n = cfg.design.cortex_grayordinates
    left_n = n // 2
    axes = []
    for name, nvert, count in (("CortexLeft", cfg.hemisphere_vertices[0], left_n),
                               ("CortexRight", cfg.hemisphere_vertices[1], n - left_n)):
        axes.append(cifti2.BrainModelAxis.from_surface(np.sort(rng.choice(nvert, count, replace=False)), nvert, name))
    mask = np.zeros((4, 4, 4), bool)
    mask.flat[rng.choice(64, cfg.subcortical, replace=False)] = True
    axes.append(cifti2.BrainModelAxis.from_mask(mask, name="ThalamusLeft", affine=np.diag([2.0, 2.0, 2.0, 1.0])))
    models = axes[0]
    for ax in axes[1:]:
        models = models + ax
    return models


def save_dtseries(path: Path, data: np.ndarray, models: cifti2.BrainModelAxis, tr: float) -> None:
    """(volumes, grayordinates) float32 as a CIFTI-2 dense time series."""
    series = cifti2.SeriesAxis(start=0.0, step=tr, size=len(data), unit="SECOND")
    img = cifti2.Cifti2Image(data.astype(np.float32), header=(series, models))
    img.nifti_header.set_intent("ConnDenseSeries")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def leading_volumes(segment_name: str) -> int:
    """Volumes before the movie starts, as in the real runs: 1 for training runs and test1, else 2."""
    return 1 if segment_name.startswith("seg") or segment_name == "test1" else 2


def _write_subject(cc: CC2017, cfg: DemoVideoConfig, subject: int, signals: dict, rng: np.random.Generator) -> dict:
    d = cfg.design
    models = brain_models(cfg, rng)
    n_all, n_ctx = len(models), d.cortex_grayordinates
    groups = rng.permutation(n_ctx)
    n_key, n_mot = int(cfg.keyframe_fraction * n_ctx), int(cfg.motion_fraction * n_ctx)
    key_vox, mot_vox = np.sort(groups[:n_key]), np.sort(groups[n_key : n_key + n_mot])
    clips = signals["keyframe"].shape[0]
    neural = np.zeros((clips, n_all))
    neural[:, key_vox], w_key = _readout(signals["keyframe"], n_key, rng)
    neural[:, mot_vox], w_mot = _readout(signals["motion"], n_mot, rng)
    kernel = hrf(d.tr)
    for seg in d.segments:
        lead = leading_volumes(seg.name)
        n_vol = lead + seg.n_clips + d.trailing_volumes
        drive = np.zeros((n_vol, n_all))
        drive[lead : lead + seg.n_clips] = neural[seg.clip_ids]
        bold = np.stack([np.convolve(drive[:, v], kernel)[:n_vol] for v in range(n_all)], axis=1)
        sd = bold.std(0)
        bold[:, sd > 0] /= sd[sd > 0]  # unit-variance planted response in every signal voxel
        t = np.linspace(-1, 1, n_vol)[:, None]
        for rep in range(1, seg.repeats + 1):
            drift = sum(rng.normal(0, cfg.drift, n_all) * t**k for k in range(1, 4))
            noise = cfg.noise * rng.normal(size=(n_vol, n_all))
            data = 1000 + rng.normal(0, 50, n_all) + rng.uniform(10, 30, n_all) * (bold + drift + noise)
            save_dtseries(cc.run_path(subject, seg, rep), data, models, d.tr)
    return {f"subject{subject}_keyframe_voxels": key_vox, f"subject{subject}_motion_voxels": mot_vox,
            f"subject{subject}_w_keyframe": w_key.astype(np.float32), f"subject{subject}_w_motion": w_mot.astype(np.float32)}


def make_demo_video(out: Path | str, cfg: DemoVideoConfig = DemoVideoConfig()) -> Path:
    """Write the look-alike under ``out`` (a cc2017 root); see the module docstring."""
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    d = cfg.design
    extras = out / "demo"
    extras.mkdir(parents=True, exist_ok=True)
    (out / "stimuli").mkdir(exist_ok=True)
    cc = CC2017(out, d)

    per_clip = int(round(cfg.fps * d.tr))
    keyframes, motion, scene_table = [], [], {}
    for seg in d.segments:
        scenes = make_scenes(seg.n_clips, rng)
        frames = render(scenes, cfg, rng)
        write_mp4(cc.video_path(seg), frames, cfg.native_fps, preset="veryfast")
        times = (np.arange(seg.n_clips) * per_clip + cfg.keyframe - 1) / cfg.fps
        keyframes.append(frames[np.floor(times * cfg.native_fps + 1e-6).astype(int)])
        motion.append(motion_features(scenes, seg.n_clips))
        scene_table[seg.name] = scenes

    torch.manual_seed(cfg.seed)
    model = clip.load_model(cfg.model, "none").model
    weights = extras / f"{cfg.model}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    m = np.concatenate(motion)
    signals = {"keyframe": keyframe_embeds(cfg, np.concatenate(keyframes), weights),
               "motion": (m - m.mean(0)) / (m.std(0) + 1e-8)}
    planted = {}
    for s in range(1, cfg.subjects + 1):
        planted.update(_write_subject(cc, cfg, s, signals, rng))
    np.savez_compressed(extras / "planted.npz", **planted, keyframe_signal=signals["keyframe"].astype(np.float32),
                        motion_signal=signals["motion"].astype(np.float32), hrf=hrf(d.tr), noise=cfg.noise)
    tiny_animatediff(cfg.seed).save_pretrained(extras / "tiny-animatediff")
    (extras / "planted.json").write_text(json.dumps({
        "config": asdict(cfg),
        "signals": {"keyframe": f"encode_image of frame {cfg.keyframe} of each clip at {cfg.fps} fps, z-scored",
                    "motion": "scene vx, vy, speed per clip (image widths / s), z-scored"},
        "response": "BOLD = offset + gain * (HRF * readout(signal) normalised to unit sd + cubic drift + noise * N(0, 1))",
        "hrf": "gamma(5) - gamma(12) / 6, peak at 4 s: the best --lag is 2 TRs",
        "weights": f"{weights.name}: random init (seed {cfg.seed}) of pipeline/model_configs/{cfg.model}.json",
        "diffusion": "tiny-animatediff: random tiny AnimateDiffVideoToVideoPipeline components; outputs are noise-like",
        "scenes": scene_table,
    }, indent=1))
    return out


def tiny_animatediff_components(seed: int = 0) -> dict:
    """Tiny random components of an AnimateDiff pipeline: a Stable Diffusion-style UNet (2 levels) and
    its MotionAdapter, a 4-level VAE (8x downsampling, like SD's), a CLIP text tower over a 4-token
    vocabulary, a DDIM scheduler; for tests and the demo."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..hub import diffusers_module

    d = diffusers_module()
    torch.manual_seed(seed)
    unet = d.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=EMBED, norm_num_groups=4, attention_head_dim=4,
    )
    motion = d.MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=4,
                             motion_num_attention_heads=2, motion_max_seq_length=32)
    vae = d.AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                          sample_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "a</w>": 3}))
        merges.write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=6)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=4, hidden_size=EMBED, intermediate_size=37, num_attention_heads=2,
                                        num_hidden_layers=1, max_position_embeddings=6, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1, projection_dim=EMBED)).eval()
    scheduler = d.DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                steps_offset=1)
    return {"unet": unet.eval(), "motion_adapter": motion, "vae": vae.eval(), "text_encoder": text,
            "tokenizer": tokenizer, "scheduler": scheduler}


def tiny_animatediff(seed: int = 0):
    """An ``AnimateDiffVideoToVideoPipeline`` of :func:`tiny_animatediff_components`."""
    from ..hub import diffusers_module

    pipe = diffusers_module().AnimateDiffVideoToVideoPipeline(**tiny_animatediff_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
