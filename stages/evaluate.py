"""DVC stage ``evaluate``: reconstructions + predictions -> ``runs/<exp>/metrics.json`` (see :mod:`pipeline.evaluation.runs`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .params import device_option, user_errors
from .settings import comma_list, require, resolve


@user_errors
def command(
    run: Path = typer.Option(..., help="Run folder that decode has filled."),
    nsd_root: Optional[Path] = typer.Option(None, help="NSD root holding nsd_stimuli.hdf5 [params: evaluate.nsd_root]."),
    device: Optional[str] = device_option(),
    retrieval_target: Optional[str] = typer.Option(
        None, help="CLIP-cache array retrieval is computed in, flattened: image_embeds, or layers/24_proj for "
        "MindEye1's protocol [params: evaluate.retrieval_target]."),
    drop_rois: Optional[str] = typer.Option(
        None, help="Also score the model with these ROIs removed, comma-separated: ROI files (floc-faces), "
        "labels (floc-faces/FFA-1) or floc (every floc-* file) [params: evaluate.drop_rois]."),
) -> None:
    """Score reconstructions with the MindEye2 protocol (metrics without local weights are reported unavailable);
    a GOD run with GOD's zero-shot protocol (top-1/top-5 among the held-out classes, fMRI->image retrieval)."""
    from pipeline.evaluation.runs import evaluate_run  # imports torch: only when run

    # weights, pool, draws, seed: params.yaml only (resolve reads a key only when it is named)
    p = resolve("evaluate", nsd_root=nsd_root, device=device, retrieval_target=retrieval_target,
                drop_rois=drop_rois, weights=None, pool=None, draws=None, seed=None)
    if "drop_rois" in p:
        p["drop_rois"] = comma_list(p["drop_rois"])
    require(p, "evaluate", "nsd_root")
    root = p.pop("nsd_root")
    weights = p.pop("weights", None) or None
    out = evaluate_run(run, root, weights=weights, **p)
    shown = out.get("reconstruction") or {k: v for k, v in out.items() if isinstance(v, float)}  # GOD: zero-shot
    typer.echo(json.dumps(shown, indent=1))
    for name, reason in out.get("unavailable", {}).items():
        typer.echo(f"{name}: unavailable ({reason})")
