"""evaluate over a decoded run folder: the MindEye2 protocol (:func:`pipeline.evaluation.metrics.evaluate`)
and the BrainCLIP tasks -> ``runs/<exp>/metrics.json`` and DVC plot data.

The run (predictions, reconstructions) and the stimuli are required; everything else is optional
and degrades to ``{"unavailable": reason}``, listed under ``unavailable`` too: a metric's network
weights, the run's CLIP cache (retrieval, BrainCLIP tasks), the COCO ``instances_*.json`` files or
the CLIP model's weights (zero-shot categories). ``metrics.json`` also records the decoder the
reconstructions came from (``decode.json``). Images are read and scored in batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..data.nsd import NSD
from ..decoding import decode
from ..decoding.run import open_run
from ..errors import UserError
from ..store import LazyRows, open_existing
from . import metrics


def evaluate_run(
    run: Path | str, nsd_root: Path | str, *, weights: dict[str, str] | None = None, device: str = "cpu",
    pool: int = 300, draws: int = 30, seed: int = 42,
) -> dict[str, Any]:
    """MindEye2-protocol metrics of a decoded run -> ``metrics.json`` (and ``plots/targets.json``)."""
    run = Path(run)
    info, preds, test_ids = open_run(run)
    if not (run / "recon").is_dir():
        raise UserError(f"{run}: no recon/ folder; run decode first")
    missing = [int(i) for i in test_ids if not (run / "recon" / decode.recon_name(i)).is_file()]
    if missing:
        raise UserError(f"{run}/recon: no reconstruction of {len(missing)} test images (first: "
                        f"{decode.recon_name(missing[0])}); run decode again")
    unavailable: dict[str, str] = {}
    brain = image = None
    if "test/image_embeds" in preds:
        try:
            clip = open_existing(Path(info["clip"]), "CLIP cache of the run")
            brain = preds["test/image_embeds"][...]
            image = decode.take_rows(clip["image_embeds"], test_ids)
        except UserError as exc:
            unavailable.update(dict.fromkeys(("retrieval_image_to_brain", "retrieval_brain_to_image"), str(exc)))
    n = len(test_ids)
    nsd = NSD(nsd_root)
    with nsd.stimuli() as brick:
        gt = LazyRows(lambda ids: decode.take_rows(brick, ids), test_ids)
        rec = LazyRows(lambda ids: decode.read_reconstructions(run / "recon", ids), test_ids)
        results = metrics.evaluate(gt, rec, brain=brain, image=image, weights=weights, device=device,
                                   pool=min(pool, n), draws=draws, seed=seed)
    results.update({k: {"unavailable": v} for k, v in unavailable.items()})
    brainclip = brainclip_tasks(preds, info, nsd, test_ids, device, pool=min(pool, n), draws=draws, seed=seed)
    fit = json.loads((run / "fit_report.json").read_text()) if (run / "fit_report.json").is_file() else {}
    numbers = {k: v for k, v in results.items() if not isinstance(v, dict)}
    missing = {k: v["unavailable"] for k, v in {**results, **brainclip}.items() if isinstance(v, dict) and "unavailable" in v}
    decoder = (json.loads((run / "decode.json").read_text()) if (run / "decode.json").is_file()
               else {"unavailable": f"no {run / 'decode.json'}"})
    out = {"method": info.get("method"), "decoder": decoder, "retrieval_pool": min(pool, n), "reconstruction": numbers,
           "brainclip": brainclip, "targets": fit.get("targets", {}), "unavailable": missing}
    (run / "metrics.json").write_text(json.dumps(out, indent=2))
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    (plots / "targets.json").write_text(json.dumps(
        [{"target": t, **{k: v for k, v in r.items() if isinstance(v, float)}} for t, r in out["targets"].items()],
        indent=2))
    return out


def brainclip_tasks(preds: zarr.Group, info: dict, nsd: NSD, test_ids: np.ndarray, device: str, *,
                    pool: int, draws: int, seed: int) -> dict[str, Any]:
    """Zero-shot category decoding (class-name prompts through the cache's own CLIP text tower)
    from predicted ``image_embeds``, and fMRI->text retrieval from predicted ``text_embeds``."""
    from ..features import clip as clip_models
    from .zeroshot import caption_targets, class_embeddings, coco_categories, zero_shot_accuracy

    out: dict[str, Any] = {}
    try:
        store = open_existing(Path(info["clip"]), "CLIP cache of the run")
    except UserError as exc:
        return {k: {"unavailable": str(exc)} for k in ("zero_shot", "fmri_to_text_top1")}
    if "test/image_embeds" in preds:
        try:
            names, labels = coco_categories(nsd, test_ids)
            loaded = clip_models.load_model(store.attrs["model"], store.attrs["pretrained"], device)
        except UserError as exc:  # no COCO instances files, no stim info, no CLIP weights
            out["zero_shot"] = {"unavailable": str(exc)}
        else:
            classes = class_embeddings(loaded, names, device=device)
            out["zero_shot"] = zero_shot_accuracy(preds["test/image_embeds"][...], classes, labels,
                                                  topk=[k for k in (1, 5) if k <= len(names)])
            out["zero_shot"]["chance_top1"] = float(labels.sum(1).mean() / len(names))
    if "test/text_embeds" in preds:
        if "text_embeds" not in store:
            out["fmri_to_text_top1"] = {"unavailable": f"{info['clip']} has no text_embeds (extract-clip --captions)"}
        else:
            truth = caption_targets(decode.take_rows(store["text_embeds"], test_ids))
            pred = preds["test/text_embeds"][...]
            if pred.ndim == 3:  # a per-caption prediction (ridge on the (n, K, D) array): reduce it like the truth
                pred = caption_targets(pred)
            ret = metrics.retrieval_top1(pred, truth, pool=pool, draws=draws, seed=seed)
            out["fmri_to_text_top1"] = ret.brain_to_image
    return out
