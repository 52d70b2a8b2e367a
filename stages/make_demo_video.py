"""DVC stage ``make_demo_video``: write the cc2017 look-alike (see :mod:`pipeline.demo.video`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .params import user_errors
from .settings import resolve, section


@user_errors
def command(
    out: Optional[Path] = typer.Option(None, help="Folder to write the look-alike cc2017 root into [params: demo_video.out]."),
    seed: Optional[int] = typer.Option(None, help="Random seed of movies, voxels, weights and noise [params: demo_video.seed]."),
    noise: Optional[float] = typer.Option(None, help="Per-run noise sd relative to the planted response [params: demo_video.noise]."),
) -> None:
    """Write a miniature cc2017 look-alike (mp4 movies, CIFTI runs) with a planted encoding model."""
    from pipeline.data.cc2017 import Design
    from pipeline.demo.video import DemoVideoConfig, make_demo_video  # imports torch: only when run
    from pipeline.store import atomic_dir

    p = resolve("demo_video", out=out, seed=seed, noise=noise)
    target = Path(p.pop("out", "data/demo_video"))
    design = section("cc2017_design")
    cfg = DemoVideoConfig(**p, **({"design": Design.from_params(design)} if design else {}))
    with atomic_dir(target) as tmp:
        make_demo_video(tmp, cfg)
    typer.echo(f"wrote {target}")
