"""DVC stage ``prepare_fmri``: one subject's betas -> ``cache/fmri/subjNN.zarr`` (see :mod:`pipeline.data.fmri`),
from the raw NSD (``--source nsd``, the default) or from a release users hold (``--source mindeye2 |
mindeye1 | brain-diffuser``, :mod:`pipeline.data.releases`): every source writes the same store."""

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
    source: str = typer.Option("nsd", help="nsd (the raw release) | mindeye2 | mindeye1 | brain-diffuser "
                               "(the preprocessed releases; see README 'Where your data comes from') | god "
                               "(Generic Object Decoding: Subject{n}.h5 and the image folder)."),
    nsd_root: Optional[Path] = typer.Option(None, "--root", "--nsd-root", help="The source's root folder: the NSD "
                                            "root, MindEye2's folder with wds/, MindEye1's webdataset_avg_split/ or "
                                            "Brain-Diffuser's data/ [params: prepare_fmri.nsd_root, for nsd]."),
    rois_from: Optional[Path] = typer.Option(None, help="A release without ROI labels: raw NSD root whose ROI "
                                             "NIfTIs add voxels/<roi> labels and voxels/ijk."),
    test_set: Optional[str] = typer.Option(None, help="--source mindeye2: new (all sessions, default) or old "
                                           "(the 37-session test set)."),
    out: Optional[Path] = typer.Option(None, help="Output store [default: cache/fmri/subjNN.zarr]."),
    zscore: Optional[str] = typer.Option(None, help="session (per session, per voxel, population std), train (per "
                                         "voxel, training trials' statistics) or none [a release: its own]."),
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
    rois: Optional[str] = typer.Option(None, help="--source god: ROIs, comma-separated (V1..V4, LOC, FFA, PPA, "
                                       "LVC, HVC, VC) [default: VC]."),
    normalize: Optional[str] = typer.Option(None, help="--source god: train (z-score with the training samples' "
                                            "statistics, the dataset's decoders) | run | none [default: train]."),
    images: Optional[Path] = typer.Option(None, help="--source god: the folder of <stimulus id>.JPEG images "
                                          "[default: ROOT/images]."),
    betas_version: Optional[str] = typer.Option(None, help="Beta folder, e.g. betas_fithrf_GLMdenoise_RR."),
) -> None:
    """Prepare one subject's fMRI cache: z-scored betas split into train/test, ROI labels per voxel."""
    from pipeline.data.fmri import prepare_fmri  # imported when run, like every stage: cli.py stays light

    if average_repeats is not None:
        alias = "mean" if average_repeats else "trials"
        if repeats not in (None, alias):
            raise UserError(f"--repeats {repeats} contradicts --{'' if average_repeats else 'no-'}average-repeats")
        repeats = alias
    if source == "god":
        _prepare_god(subject, nsd_root, out, rois=rois, normalize=normalize, images=images,
                     ignored=(zscore, repeats, sessions, train_sessions, beta_format, betas_version, test_set, rois_from))
        return
    if any(v is not None for v in (rois, normalize, images)):
        raise UserError("--rois, --normalize and --images apply to --source god")
    if source != "nsd":
        _prepare_release(source, subject, nsd_root, out, zscore=zscore, repeats=repeats, sessions=sessions,
                         test_set=test_set, rois_from=rois_from, ignored=(train_sessions, beta_format, betas_version))
        return
    if rois_from is not None or test_set is not None:
        raise UserError("--rois-from and --test-set apply to the preprocessed releases (--source mindeye2 | ...)")
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


def _prepare_release(source: str, subject: int, root: Optional[Path], out: Optional[Path], *, ignored: tuple,
                     **options) -> None:
    """``--source`` a preprocessed release: only what the command line gives applies (params.yaml's
    prepare_fmri section describes the raw NSD run of the demo)."""
    from pipeline.data.releases import prepare_release

    if any(v is not None for v in ignored):
        raise UserError("--train-sessions, --beta-format and --betas-version apply to --source nsd")
    if root is None:
        raise UserError(f"--source {source} needs --root (the release's folder)")
    given = {k: v for k, v in options.items() if v is not None}
    target = out or Path(f"cache/fmri/{source}_subj{subject:02d}.zarr")
    prepare_release(source, root, subject, target, **given)
    typer.echo(f"wrote {target}")


def _prepare_god(subject: int, root: Optional[Path], out: Optional[Path], *, rois: Optional[str],
                 normalize: Optional[str], images: Optional[Path], ignored: tuple) -> None:
    """``--source god``: the store of :func:`pipeline.data.god_store.prepare_god` and its image brick."""
    from pipeline.data.god_store import prepare_god

    from .settings import comma_list

    if any(v is not None for v in ignored):
        raise UserError("--source god takes --root, --subject, --rois, --normalize, --images and --out only")
    if root is None:
        raise UserError("--source god needs --root (the folder of Subject{n}.h5)")
    target = out or Path(f"cache/fmri/god_subj{subject:02d}.zarr")
    prepare_god(root, subject, target, rois=comma_list(rois) if rois else ("VC",), normalize=normalize or "train",
                images=images)
    typer.echo(f"wrote {target}")
