"""DVC stage ``analyze_layers``: fMRI cache + CLIP cache -> ``runs/alignment_subjNN/`` (see :mod:`pipeline.analysis.alignment`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .params import device_option, user_errors
from .settings import comma_list, require, resolve


@user_errors
def command(
    fmri: Path = typer.Option(..., help="fMRI cache made by prepare-fmri (averaged or per-trial)."),
    clip: Optional[Path] = typer.Option(None, help="CLIP cache made by extract-clip [params: analyze_layers.clip]."),
    out: Optional[Path] = typer.Option(None, help="Output folder [default: runs/alignment_<fmri store name>, e.g. runs/alignment_subj01]."),
    fmri_trials: Optional[Path] = typer.Option(
        None, help="Per-trial store of the same subject (prepare-fmri --no-average-repeats) for the noise ceiling, "
        "when --fmri holds no single trials."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated cached layers, e.g. 8,16,24 or 11-20:mean [default: every layers/* array]."),
    rois: Optional[str] = typer.Option(None, help="Comma-separated ROI files, e.g. prf-visualrois,floc [default: every ROI file in the store]."),
    features: Optional[str] = typer.Option(None, help="How a layer's tokens become one vector per image: mean (patch tokens) | cls | flatten [default: mean]."),
    device: Optional[str] = device_option(),
) -> None:
    """Which CLIP layer each brain area matches: ridge encoding, RSA, noise ceiling and layer CKA."""
    from pipeline.analysis.alignment import analyze_layers  # imports torch: only when run

    p = resolve("analyze_layers", clip=clip, layers=layers, rois=rois, features=features, min_voxels=None,
                encoding=None, recommend=None)
    require(p, "analyze_layers", "clip")
    encoding = {**dict(p.get("encoding") or {}), **resolve("analyze_layers", device=device)}  # execution.analyze_layers
    out = out or Path("runs") / f"alignment_{fmri.stem}"
    result = analyze_layers(
        fmri, p["clip"], out, layers=comma_list(p.get("layers")), rois=comma_list(p.get("rois")),
        features=p.get("features", "mean"), fmri_trials=fmri_trials, min_voxels=p.get("min_voxels", 10),
        encoding=encoding, recommend_cfg=p.get("recommend"),
    )
    typer.echo(json.dumps({"best_layer": result["best_layer"], "recommended": {k: result["recommended"][k] for k in ("detail", "semantic")}}, indent=1))
    typer.echo(f"wrote {out}")
