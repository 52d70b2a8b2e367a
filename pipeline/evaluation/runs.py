"""evaluate over a decoded run folder: the MindEye2 protocol (:func:`pipeline.evaluation.metrics.evaluate`)
and the BrainCLIP tasks -> ``runs/<exp>/metrics.json`` and DVC plot data."""

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
from ..features.cache import open_cache
from ..store import write_text
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
    with NSD(nsd_root).stimuli() as brick:
        gt = decode.take_rows(brick, test_ids)
    rec = decode.read_reconstructions(run / "recon", test_ids)
    brain = image = None
    if "test/image_embeds" in preds:
        clip = open_cache(Path(info["clip"]), rows=test_ids)
        brain = preds["test/image_embeds"][...]
        image = decode.take_rows(clip["image_embeds"], test_ids)
    n = len(test_ids)
    results = metrics.evaluate(gt, rec, brain=brain, image=image, weights=weights, device=device,
                               pool=min(pool, n), draws=draws, seed=seed)
    brainclip = brainclip_tasks(preds, info, NSD(nsd_root), test_ids, device, pool=min(pool, n), draws=draws, seed=seed)
    fit = json.loads((run / "fit_report.json").read_text()) if (run / "fit_report.json").is_file() else {}
    numbers = {k: v for k, v in results.items() if not isinstance(v, dict)}
    missing = {k: v["unavailable"] for k, v in results.items() if isinstance(v, dict)}
    out = {"method": info.get("method"), "retrieval_pool": min(pool, n), "reconstruction": numbers,
           "brainclip": brainclip, "targets": fit.get("targets", {}), "unavailable": missing}
    write_text(run / "metrics.json", json.dumps(out, indent=2))
    write_text(run / "plots" / "targets.json", json.dumps(
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
    store = open_cache(Path(info["clip"]), rows=test_ids)
    if "test/image_embeds" in preds:
        names, labels = coco_categories(nsd, test_ids)
        loaded = clip_models.load_model(store.attrs["model"], store.attrs["pretrained"], device)
        classes = class_embeddings(loaded, names, device=device)
        out["zero_shot"] = zero_shot_accuracy(preds["test/image_embeds"][...], classes, labels,
                                              topk=[k for k in (1, 5) if k <= len(names)])
        out["zero_shot"]["chance_top1"] = float(labels.sum(1).mean() / len(names))
    if "test/text_embeds" in preds and "text_embeds" in store:
        truth = caption_targets(decode.take_rows(store["text_embeds"], test_ids))
        ret = metrics.retrieval_top1(preds["test/text_embeds"][...], truth, pool=pool, draws=draws, seed=seed)
        out["fmri_to_text_top1"] = ret.brain_to_image
    return out
