"""Seconds per reconstructed clip of decode-video's two decoders, at real architecture sizes.

``interpolate`` (no weights: phase correlation, shift, blend) is the baseline measured in the same
run as ``diffusion`` (diffusers' AnimateDiffVideoToVideoPipeline). With ``--arch sd15`` the diffusion
components have the shapes of the real models (Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L text
encoder; the v1-5-2 MotionAdapter) with random weights, so only the timings mean anything; the
tokenizer is a tiny stand-in (prompt encoding is a negligible part). Each denoising step is timed
through the pipeline's step callback, so a short run (``--steps 2 --strength 0.5`` = 1 step) also
gives the per-step cost; ``estimate_seconds_per_clip`` extrapolates to ``--full-steps`` x
``--strength`` steps.

    python benchmarks/video_decode.py [--arch sd15|tiny] [--size 256] [--frames 6] [--steps 25] [--strength 0.6]
        [--full-steps 25] [--guidance 7.5] [--clips 1] [--device auto] [--threads N] [--out result.json]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402  (benchmarks/ is the script's folder)

from pipeline.decoding import video  # noqa: E402
from pipeline.demo.video import tiny_animatediff, tiny_animatediff_components  # noqa: E402
from pipeline.hub import diffusers_module  # noqa: E402


def sd15_pipeline():
    """AnimateDiff video-to-video with the real SD 1.5 / MotionAdapter v1-5-2 shapes, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    d = diffusers_module()
    parts = tiny_animatediff_components()  # the tokenizer and scheduler; the models are replaced below
    torch.manual_seed(0)
    unet = d.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    )
    motion = d.MotionAdapter(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                             motion_mid_block_layers_per_block=1, motion_num_attention_heads=8,
                             motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True)
    vae = d.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                          sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    parts["tokenizer"].model_max_length = 77
    pipe = d.AnimateDiffVideoToVideoPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=parts["tokenizer"],
                                             unet=unet.eval(), motion_adapter=motion, scheduler=parts["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--full-steps", type=int, default=25, help="steps of the extrapolated full decode")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--clips", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, (args.clips, args.size, args.size, 3), dtype=np.uint8)
    blurry = rng.integers(0, 256, (args.clips, args.frames, 64, 64, 3), dtype=np.uint8)
    t = time.perf_counter()
    init = np.stack([video.interpolate(k, b, args.frames // 2, args.size) for k, b in zip(keys, blurry)])
    interpolate_s = (time.perf_counter() - t) / args.clips

    t = time.perf_counter()
    pipe = sd15_pipeline() if args.arch == "sd15" else tiny_animatediff()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe.to(device, dtype)
    build_s = time.perf_counter() - t
    stamps: list[float] = []

    def stamp(pipe, i, timestep, kwargs):  # a timestamp after every denoising step
        stamps.append(time.perf_counter())
        return kwargs

    t = time.perf_counter()
    for k, v in enumerate(init):
        pipe(video=[[Image.fromarray(f) for f in v]], prompt="", height=args.size, width=args.size,
             num_inference_steps=args.steps, strength=args.strength, guidance_scale=args.guidance, output_type="np",
             generator=torch.Generator("cpu").manual_seed(k), callback_on_step_end=stamp)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    total = (time.perf_counter() - t) / args.clips
    steps_run = len(stamps) // args.clips
    per_step = float(np.median(np.diff(stamps))) if steps_run > 1 else (stamps[0] - t) if stamps else float("nan")
    fixed = total - per_step * steps_run
    full = int(args.full_steps * args.strength)
    emit({
        "benchmark": "decode-video seconds per clip",
        "arch": args.arch, "random_weights": True, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "size": args.size, "frames": args.frames, "guidance": args.guidance,
        "interpolate_seconds_per_clip": round(interpolate_s, 4),
        "diffusion": {"steps": args.steps, "strength": args.strength, "denoising_steps_run": steps_run,
                      "seconds_per_clip": round(total, 3), "seconds_per_step": round(per_step, 3),
                      "seconds_outside_steps": round(fixed, 3), "build_seconds": round(build_s, 2)},
        "estimate_seconds_per_clip": {"full_steps": args.full_steps, "denoising_steps": full,
                                      "diffusion": round(fixed + per_step * full, 2),
                                      "interpolate": round(interpolate_s, 4)},
    }, args.out)


if __name__ == "__main__":
    main()
