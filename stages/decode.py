"""DVC stage ``decode``: a run's predictions -> ``runs/<exp>/recon/`` + ``recon_grid.png`` (see :mod:`pipeline.decoding.run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .params import device_option, user_errors
from .settings import require, resolve


@user_errors
def command(
    run: Path = typer.Option(..., help="Run folder written by fit-adapters, e.g. runs/ridge."),
    nsd_root: Optional[Path] = typer.Option(None, help="NSD root holding nsd_stimuli.hdf5 [params: decode.nsd_root]."),
    method: Optional[str] = typer.Option(None, help="retrieval (nearest cached image; no weights) or unclip."),
    target: Optional[str] = typer.Option(None, help="Predicted array to decode from [default: image_embeds]."),
    include_test: Optional[bool] = typer.Option(None, "--include-test/--exclude-test", help="Let retrieval return the test images themselves."),
    samples: Optional[int] = typer.Option(None, help="Reconstructions per test image."),
    unclip_model: Optional[str] = typer.Option(None, help="Stable unCLIP hub id or local folder (method unclip)."),
    detail_target: Optional[str] = typer.Option(None, help="unclip: start from the nearest image by these predicted tokens (the detail branch)."),
    strength: Optional[float] = typer.Option(None, help="unclip img2img strength when --detail-target is set."),
    steps: Optional[int] = typer.Option(None, help="unclip denoising steps."),
    guidance: Optional[float] = typer.Option(None, help="unclip classifier-free guidance scale."),
    noise_level: Optional[int] = typer.Option(None, help="unclip noise added to the image embedding."),
    seed: Optional[int] = typer.Option(None, help="Seed of the unclip generators."),
    device: Optional[str] = device_option(),
) -> None:
    """Turn predicted embeddings into images: retrieval from the CLIP cache, or Stable unCLIP."""
    from pipeline.decoding.run import decode_run  # imports torch: only when run

    p = resolve("decode", nsd_root=nsd_root, method=method, target=target, include_test=include_test,
                samples=samples, unclip_model=unclip_model, detail_target=detail_target, strength=strength,
                steps=steps, guidance=guidance, noise_level=noise_level, seed=seed, device=device)
    require(p, "decode", "nsd_root")
    root = p.pop("nsd_root")
    typer.echo(f"wrote {decode_run(run, root, **p)}")
