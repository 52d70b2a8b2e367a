"""DVC stages ``fit_adapters`` and ``fit_video``: fMRI cache + CLIP cache -> ``runs/<exp>/`` (see
:mod:`pipeline.fitting.fit`).

Parameters live in the ``fit_adapters`` section of params.yaml (``--section fit_video`` for the
video caches): the two stores, and one entry per experiment under ``experiments`` (its method,
targets, ROIs); each method's own settings sit in a section named after it (``ridge``, ``mclip``,
``litemind``, ``perception``; trained methods carry a ``train`` sub-section with
:class:`pipeline.fitting.train.TrainConfig` fields).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import UserError

from .params import resolve, section, user_errors


def _split(text: str | list | None) -> list[str] | None:
    if text is None or isinstance(text, list):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


@user_errors
def command(
    experiment: Optional[str] = typer.Option(None, help="Name of an experiment in params.yaml fit_adapters.experiments; its settings are the defaults."),
    fmri: Optional[Path] = typer.Option(None, help="fMRI cache made by prepare-fmri [params: fit_adapters.fmri]."),
    clip: Optional[Path] = typer.Option(None, help="CLIP cache made by extract-clip [params: fit_adapters.clip]."),
    method: Optional[str] = typer.Option(None, help="ridge, mclip, litemind or perception (video frames)."),
    out: Optional[Path] = typer.Option(None, help="Run folder [default: runs/<experiment or method>]."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated CLIP-cache arrays, e.g. image_embeds,layers/24 (mclip: detail,semantic[,text])."),
    rois: Optional[str] = typer.Option(None, help="Ridge input voxels: comma-separated ROI names (labels > 0), default all nsdgeneral."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs of mclip / litemind."),
    seed: Optional[int] = typer.Option(None, help="Seed of folds, initialisation and batching."),
    device: Optional[str] = typer.Option(None, help="auto (cuda when present), cpu or cuda[:N]."),
    subject: Optional[int] = typer.Option(None, help="Refuse an fMRI cache of another subject."),
    params_section: str = typer.Option("fit_adapters", "--section", help="params.yaml section to read "
                                       "(fit_video: the video experiments)."),
) -> None:
    """Fit fMRI -> CLIP-layer adapters (ridge, BrainMCLIP, Lite-Mind; perception for video frames) from the caches
    and predict the test set."""
    from pipeline.fitting.fit import fit_adapters  # imports torch: only when run

    base = section(params_section)
    exp = {}
    if experiment is not None:
        exp = (base.get("experiments") or {}).get(experiment)
        if exp is None:
            raise UserError(f"params.yaml: no experiment {experiment!r} in {params_section}.experiments")
    p = resolve(params_section, fmri=fmri, clip=clip, seed=seed, device=device, subject=subject)
    chosen = method or exp.get("method")
    if chosen is None:
        raise UserError("give --method (ridge, mclip, litemind or perception) or --experiment")
    settings = dict(base.get(chosen) or {})
    train = dict(settings.pop("train", None) or {})
    if epochs is not None:
        train["epochs"] = epochs
    for key in ("fmri", "clip"):
        if key not in p:
            raise UserError(f"give --{key} or set {params_section}.{key} in params.yaml")
    run = out or Path("runs") / (experiment or chosen)
    report = fit_adapters(
        p["fmri"], p["clip"], chosen, run,
        targets=_split(targets) or _split(exp.get("targets")),
        rois=_split(rois) or _split(exp.get("rois")),
        params={**settings, **(exp.get("params") or {})},
        train=train, subject=p.get("subject"), seed=p.get("seed", 0), device=p.get("device", "auto"),
        holdout_categories=_split(exp.get("holdout_categories")), nsd_root=base.get("nsd_root"),
    )
    typer.echo(json.dumps({name: {k: round(v, 4) for k, v in r.items()} for name, r in report["targets"].items()}, indent=1))
    typer.echo(f"wrote {run}")
