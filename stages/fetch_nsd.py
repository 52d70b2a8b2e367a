"""``fetch-nsd``: the raw NSD files this pipeline reads, from the public bucket (not a DVC stage;
see :mod:`pipeline.data.fetch`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .params import user_errors
from .settings import comma_list


@user_errors
def command(
    subjects: str = typer.Option(..., help="NSD subject numbers, comma-separated, e.g. 1,2,5,7."),
    out: Path = typer.Option(..., help="Output folder: an NSD root (the bucket's relative paths)."),
    what: Optional[str] = typer.Option(None, help="Comma-separated parts: betas,rois,stimuli,design (default: all)."),
    endpoint_url: Optional[str] = typer.Option(None, help="An S3-compatible mirror of the bucket (default: AWS S3)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and their total size; write nothing."),
    accept_nsd_terms: bool = typer.Option(
        False, "--accept-nsd-terms", help="You accepted the NSD Terms and Conditions (naturalscenesdataset.org); "
        "recorded in --out, so later fetches into it need no flag."
    ),
    threads: int = typer.Option(8, min=1, help="Parallel transfers."),
) -> None:
    """Fetch the raw NSD subset this pipeline reads (betas, ROIs, stimuli, design): resumable, verified."""
    from pipeline.data.fetch import fetch_nsd, parse_parts
    from pipeline.errors import UserError

    try:
        numbers = [int(s) for s in comma_list(subjects) or []]
    except ValueError:
        raise UserError(f"--subjects takes comma-separated numbers such as 1,2,5,7; got {subjects!r}") from None
    fetch_nsd(out, numbers, parse_parts(what), endpoint_url, dry_run, accept_nsd_terms, threads, echo=typer.echo)
    if not dry_run:
        typer.echo(f"fetched into {out}")
