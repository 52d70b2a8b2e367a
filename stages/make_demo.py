"""DVC stage ``make_demo``: write the NSD look-alike (see :mod:`pipeline.demo.nsd`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .params import user_errors
from .settings import resolve


@user_errors
def command(
    out: Optional[Path] = typer.Option(None, help="Folder to write the look-alike NSD root into [params: demo.out]."),
    seed: Optional[int] = typer.Option(None, help="Random seed of images, design, weights and noise [params: demo.seed]."),
    noise: Optional[float] = typer.Option(None, help="Trial noise sd relative to the planted signal [params: demo.noise]."),
) -> None:
    """Write a miniature NSD look-alike with a planted encoding model (the embedded demo data)."""
    from pipeline.demo.nsd import DemoConfig, make_demo  # imports torch: only when run
    from pipeline.store import atomic_dir

    p = resolve("demo", out=out, seed=seed, noise=noise)
    target = Path(p.pop("out", "data/demo"))
    with atomic_dir(target) as tmp:
        make_demo(tmp, DemoConfig(**p))
    typer.echo(f"wrote {target}")
