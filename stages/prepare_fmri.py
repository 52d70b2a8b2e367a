"""DVC stage ``prepare_fmri``: one subject's betas -> ``cache/fmri/subjNN.zarr`` (see :mod:`pipeline.data.fmri`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import UserError

from .params import user_errors
from .settings import require, resolve


@user_errors
def command(
    subject: int = typer.Option(..., help="NSD subject number (1-based, as in subj01)."),
    nsd_root: Optional[Path] = typer.Option(None, help="NSD root folder [params: prepare_fmri.nsd_root]."),
    out: Optional[Path] = typer.Option(None, help="Output store [default: cache/fmri/subjNN.zarr]."),
    zscore: Optional[str] = typer.Option(None, help="session (per session, per voxel, population std) or none."),
    repeats: Optional[str] = typer.Option(
        None, help="mean (one row per image: the mean of its trials), trials (one row per trial) or train-trials "
        "(train rows per trial, test rows per image) [params: prepare_fmri.repeats]."
    ),
    average_repeats: Optional[bool] = typer.Option(
        None, "--average-repeats/--no-average-repeats", help="Aliases of --repeats mean / --repeats trials."
    ),
    sessions: Optional[int] = typer.Option(None, help="Use the first K sessions [default: all present]."),
    train_sessions: Optional[int] = typer.Option(None, help="Training rows from the first K sessions only; test rows from every session used (MindEye2's 1-hour protocol)."),
    beta_format: Optional[str] = typer.Option(None, help="auto (prefer .hdf5), hdf5 or nifti."),
    betas_version: Optional[str] = typer.Option(None, help="Beta folder, e.g. betas_fithrf_GLMdenoise_RR."),
) -> None:
    """Prepare one subject's fMRI cache: z-scored betas split into train/test, ROI labels per voxel."""
    from pipeline.data.fmri import prepare_fmri  # imported when run, like every stage: cli.py stays light

    if average_repeats is not None:
        alias = "mean" if average_repeats else "trials"
        if repeats not in (None, alias):
            raise UserError(f"--repeats {repeats} contradicts --{'' if average_repeats else 'no-'}average-repeats")
        repeats = alias
    p = resolve(
        "prepare_fmri", nsd_root=nsd_root, zscore=zscore, repeats=repeats,
        sessions=sessions, beta_format=beta_format, betas_version=betas_version,
    )
    if train_sessions is not None:
        p["train_sessions"] = train_sessions
    p.pop("subjects", None)
    require(p, "prepare_fmri", "nsd_root")
    root = p.pop("nsd_root")
    target = out or Path(f"cache/fmri/subj{subject:02d}.zarr")
    prepare_fmri(root, subject, target, **p)
    typer.echo(f"wrote {target}")
