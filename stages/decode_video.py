"""DVC stage ``decode_video``: a semantics run + a perception run -> ``runs/video_<method>/`` (one mp4 and
contact sheet per test clip, ``recon_grid.png``, ``decode.json``; see :mod:`pipeline.decoding.video_run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .params import device_option, user_errors
from .settings import require, resolve


@user_errors
def command(
    semantic: Optional[Path] = typer.Option(None, help="Run predicting the keyframes' image_embeds [params: decode_video.semantic]."),
    perception: Optional[Path] = typer.Option(None, help="Run predicting the blurry frames [params: decode_video.perception]."),
    out: Optional[Path] = typer.Option(None, help="Output folder [default: runs/video_<method>]."),
    method: Optional[str] = typer.Option(None, help="interpolate (no weights) or diffusion (AnimateDiff video-to-video)."),
    keyframes: Optional[str] = typer.Option(None, help="retrieval (nearest training keyframe) or unclip."),
    size: Optional[int] = typer.Option(None, help="Frame size of the reconstructions [default: the cache's frame size]."),
    unclip_model: Optional[str] = typer.Option(None, help="Stable unCLIP hub id or folder (--keyframes unclip)."),
    video_model: Optional[str] = typer.Option(None, help="AnimateDiff pipeline folder, or an SD 1.x folder / hub id (diffusion)."),
    motion_adapter: Optional[str] = typer.Option(None, help="MotionAdapter folder or hub id, with an SD 1.x --video-model."),
    steps: Optional[int] = typer.Option(None, help="Diffusion steps."),
    strength: Optional[float] = typer.Option(None, help="Diffusion strength: the fraction of steps run from the init video."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale."),
    prompt: Optional[str] = typer.Option(None, help="Text prompt of the video model [default: empty]."),
    seed: Optional[int] = typer.Option(None, help="Seed of the per-clip generators."),
    device: Optional[str] = device_option(),
) -> None:
    """Reconstruct test clips from a keyframe (semantics) and blurry frames (perception): interpolate or diffusion."""
    from pipeline.decoding.video_run import decode_video_run  # imports torch: only when run

    p = resolve("decode_video", semantic=semantic, perception=perception, method=method, keyframes=keyframes,
                size=size, unclip_model=unclip_model, video_model=video_model, motion_adapter=motion_adapter,
                steps=steps, strength=strength, guidance=guidance, prompt=prompt, seed=seed, device=device)
    require(p, "decode_video", "semantic", "perception")
    runs = {k: p.pop(k) for k in ("semantic", "perception")}
    target = out or Path("runs") / f"video_{p.get('method', 'interpolate')}"
    typer.echo(f"wrote {decode_video_run(runs['semantic'], runs['perception'], target, **p)}")
