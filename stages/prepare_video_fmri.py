"""DVC stage ``prepare_video_fmri``: one cc2017 subject's CIFTI runs -> ``cache/fmri/cc2017_subjNN.zarr``
(see :mod:`pipeline.data.video_fmri`). The dataset's sizes come from params.yaml ``cc2017_design``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .params import user_errors
from .settings import require, resolve, section


@user_errors
def command(
    subject: int = typer.Option(..., help="cc2017 subject number (1-based, as in subject1)."),
    root: Optional[Path] = typer.Option(None, help="cc2017 root holding subject<N>/fmri/ [params: prepare_video_fmri.root]."),
    out: Optional[Path] = typer.Option(None, help="Output store [default: cache/fmri/cc2017_subjNN.zarr]."),
    lag: Optional[int] = typer.Option(None, help="Haemodynamic lag in TRs: clip t pairs with volume t + lag [default: 2]."),
    select: Optional[str] = typer.Option(None, help="reproducible (Bonferroni-significant test-retest voxels) or all."),
    alpha: Optional[float] = typer.Option(None, help="Bonferroni-corrected p threshold of --select reproducible [default: 0.05]."),
) -> None:
    """Prepare one subject's video fMRI cache: detrended, z-scored, lag-aligned TRs; test averaged over repeats."""
    from pipeline.data.cc2017 import Design
    from pipeline.data.video_fmri import prepare_video_fmri

    p = resolve("prepare_video_fmri", root=root, lag=lag, select=select, alpha=alpha)
    require(p, "prepare_video_fmri", "root")
    source = p.pop("root")
    target = out or Path(f"cache/fmri/cc2017_subj{subject:02d}.zarr")
    prepare_video_fmri(source, subject, target, design=Design.from_params(section("cc2017_design")), **p)
    typer.echo(f"wrote {target}")
