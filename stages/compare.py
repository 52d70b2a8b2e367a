"""``compare``: paired differences of evaluated runs with bootstrap intervals and Holm-corrected
permutation p-values (see :mod:`pipeline.evaluation.compare`). Not a DVC stage: it reads what
evaluate wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .params import user_errors


@user_errors
def command(
    runs: list[Path] = typer.Argument(..., help="Evaluated run folders; each after the first is compared with the first."),
    out: Optional[Path] = typer.Option(None, help="Also write the comparison as JSON here."),
    draws: int = typer.Option(1000, help="Bootstrap draws over test images."),
    permutations: int = typer.Option(10000, help="Sign-flip permutations of the p-values."),
    seed: int = typer.Option(0, help="Seed of the bootstrap and the permutations."),
) -> None:
    """Per metric: B - A over the same test images, its 95% bootstrap interval and a Holm-corrected p-value."""
    from pipeline.evaluation.compare import compare_runs, table
    from pipeline.store import write_text

    result = compare_runs(runs, draws=draws, seed=seed, permutations=permutations)
    typer.echo(table(result))
    if out is not None:
        write_text(out, json.dumps(result, indent=2))
        typer.echo(f"wrote {out}")
