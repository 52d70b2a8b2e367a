"""DVC stages ``fit_adapters`` and ``fit_video``: fMRI cache + CLIP cache -> ``runs/<exp>/`` (see
:mod:`pipeline.fitting.fit`).

Parameters live in the ``fit_adapters`` section of params.yaml (``--section fit_video`` for the
video caches): the two stores, and one entry per experiment under ``experiments`` (its method,
targets, ROIs); each method's own settings sit in a section named after it (``ridge``, ``mclip``,
``litemind``, ``perception``; trained methods carry a ``train``
sub-section with :class:`pipeline.fitting.train.TrainConfig` fields). Multi-subject runs: an
experiment's ``fmri`` (a list of stores), ``align``, ``experts``, ``init``, ``finetune`` and
``train`` override, and ``fit_adapters.subjects`` holds the
:class:`pipeline.fitting.adapters.subjects.SubjectConfig` defaults. The device and the memory budget
are ``execution.fit_adapters`` (no DVC param). Settings are resolved once by
:func:`stages.specs.fit_spec` (command line > experiment > section > defaults). Runs unchanged under
``torchrun --nproc-per-node N cli.py fit-adapters ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .params import device_option, user_errors


@user_errors
def command(
    experiment: Optional[str] = typer.Option(None, help="Name of an experiment in params.yaml fit_adapters.experiments; its settings are the defaults."),
    fmri: Optional[str] = typer.Option(None, help="fMRI cache made by prepare-fmri, or a comma-separated list of several subjects' caches (one multi-subject model) [params: fit_adapters.fmri]."),
    clip: Optional[Path] = typer.Option(None, help="CLIP cache made by extract-clip [params: fit_adapters.clip]."),
    method: Optional[str] = typer.Option(None, help="ridge, mclip, litemind or perception (video frames)."),
    out: Optional[Path] = typer.Option(None, help="Run folder [default: runs/<experiment or method>]."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated CLIP-cache arrays, e.g. image_embeds,layers/24 (mclip: detail,semantic[,text])."),
    rois: Optional[str] = typer.Option(None, help="Ridge input voxels: comma-separated ROI names (labels > 0), default all nsdgeneral."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs of mclip / litemind."),
    seed: Optional[int] = typer.Option(None, help="Seed of folds, initialisation and batching."),
    device: Optional[str] = device_option(),
    subject: Optional[int] = typer.Option(None, help="Refuse an fMRI cache of another subject."),
    align: Optional[str] = typer.Option(None, help="Multi-subject input layers: voxels (a linear map per subject, MindEye2) or roi (per-ROI-label tokens)."),
    experts: Optional[int] = typer.Option(None, help="K brain experts after the shared trunk, trained in a second stage (Wills Aligner)."),
    init: Optional[Path] = typer.Option(None, help="Pre-trained multi-subject run to fine-tune on the new subject of --fmri."),
    finetune: Optional[str] = typer.Option(None, help="With --init: all (everything), lora or skip-lora (adapters only) [default: all]."),
    lora_rank: Optional[int] = typer.Option(None, help="Rank of the LoRA / Skip-LoRA adapters [params: fit_adapters.subjects.lora_rank]."),
    params_section: str = typer.Option("fit_adapters", "--section", help="params.yaml section to read "
                                       "(fit_video: the video experiments)."),
) -> None:
    """Fit fMRI -> CLIP-layer adapters (ridge, BrainMCLIP, Lite-Mind; perception for video frames) from the caches
    and predict the test set."""
    from pipeline.fitting.fit import fit_adapters  # imports torch: only when run

    from .specs import fit_spec

    spec, run = fit_spec(params_section, experiment, dict(
        fmri=fmri, clip=clip, method=method, out=out, targets=targets, rois=rois, epochs=epochs, seed=seed,
        device=device, subject=subject, align=align, experts=experts, init=init, finetune=finetune, lora_rank=lora_rank))
    report = fit_adapters(spec.fmri, spec.clip, spec.method, spec.out, device=run.device, **spec.options())
    if not report:  # another process of a torchrun run: process 0 writes and reports
        return
    typer.echo(json.dumps({name: {k: round(v, 4) for k, v in r.items()} for name, r in report["targets"].items()}, indent=1))
    if "subjects" in report:
        typer.echo(f"(mean over {', '.join(report['subjects'])})")
    typer.echo(f"wrote {spec.out}")
