"""DVC stage ``make_demo_god``: write the GOD look-alike (see :mod:`pipeline.demo.god`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .params import user_errors
from .settings import resolve


@user_errors
def command(
    out: Optional[Path] = typer.Option(None, help="Folder to write the look-alike into [params: demo_god.out]."),
    seed: Optional[int] = typer.Option(None, help="Random seed [params: demo_god.seed]."),
    noise: Optional[float] = typer.Option(None, help="Trial noise sd [params: demo_god.noise]."),
) -> None:
    """Write a miniature GOD look-alike: fmri/Subject{n}.h5 (BData), images/<id>.JPEG, planted.npz."""
    from pipeline.demo.god import GODDemoConfig, make_god_demo

    p = resolve("demo_god", out=out, seed=seed, noise=noise)
    target = Path(p.pop("out", "data/demo_god"))
    make_god_demo(target, GODDemoConfig(**p))
    typer.echo(f"wrote {target}")
