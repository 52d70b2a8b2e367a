"""DVC stage ``evaluate_video``: a decode-video folder -> ``metrics.json`` (see :mod:`pipeline.evaluation.video`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .params import device_option, user_errors
from .settings import resolve


@user_errors
def command(
    run: Path = typer.Option(..., help="Folder written by decode-video, e.g. runs/video_interpolate."),
    video: Optional[Path] = typer.Option(None, help="cc2017 root (or stimuli/) if the movies moved since extraction."),
    videomae: Optional[str] = typer.Option(None, help="VideoMAE classifier folder or hub id (read from the HF cache only)."),
    device: Optional[str] = device_option(),
    trials: Optional[int] = typer.Option(None, help="Draws of distractors per clip in n-way identification."),
    seed: Optional[int] = typer.Option(None, help="Seed of the n-way draws."),
) -> None:
    """Score reconstructed clips: SSIM, PSNR, CLIP-pcc, n-way identification (VideoMAE when its weights are present)."""
    from pipeline.evaluation.video import evaluate_video_run  # imports torch: only when run

    p = resolve("evaluate_video", video=video, videomae=videomae, device=device, trials=trials, seed=seed)
    params = resolve("evaluate_video", n_ways=None)
    out = evaluate_video_run(run, **p, **params)
    typer.echo(json.dumps(out["reconstruction"], indent=1))
    for name, reason in out["unavailable"].items():
        typer.echo(f"{name}: unavailable ({reason})")
