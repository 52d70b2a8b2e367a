"""Baselines that expose memorisation, beside every run's metrics (``metrics.json`` -> ``baselines``).

Spurious reconstruction (Shirakawa et al. 2024, arXiv 2405.10078): NSD's test images share semantic
clusters with its training images, so a decoder can score well by recalling a training image. Two
lookups show how much of a score that already achieves, scored with the same protocol as the run
(:func:`pipeline.evaluation.metrics.evaluate`: pixel metrics always, network metrics when their
weights are present, retrieval in the run's retrieval space) and with the same bootstrap intervals:

- ``nearest_training_image``: the project's ``retrieval`` decoder restricted to the subject's
  training images, queried with the run's own predictions (the decoder's target, ``decode.json``);
- ``category_prior``: the training image closest (cosine) to the mean of the training targets,
  the same image for every test trial (a constant guess; its retrieval and two-way scores are at
  or below chance by construction: every candidate ties).

``train_test_overlap``: per test image, the largest cosine similarity of its ``image_embeds`` to any
training image's (the train/test overlap Shirakawa et al. measured), as quantiles, once per split.
Training images are those of the subject's fMRI store (``train`` split; a run that held categories
out trained on fewer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..data.dataset import Dataset
from ..decoding import decode
from ..errors import UserError
from ..features.cache import open_cache
from ..fitting.pairs import row_ids
from ..fitting.run_folder import RunInfo
from ..store import LazyRows, open_existing
from . import bootstrap, intervals, metrics

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def not_training(n_bank: int, train_ids: np.ndarray) -> np.ndarray:
    """Bank rows that are not training images (excluded from every lookup)."""
    return np.setdiff1d(np.arange(n_bank), train_ids)


def nearest_training(pred: np.ndarray, bank, train_ids: np.ndarray) -> np.ndarray:
    """(n,) the training row most cosine-similar to each prediction (the retrieval decoder)."""
    ids, _ = decode.nearest_rows(pred, bank, exclude=not_training(bank.shape[0], train_ids))
    return ids[:, 0]


def category_prior(bank, train_ids: np.ndarray, block: int = 256) -> int:
    """The training row most cosine-similar to the mean of the training rows (read in blocks)."""
    ids = np.sort(np.asarray(train_ids))
    total = None
    for start in range(0, len(ids), block):
        rows = decode.take_rows(bank, ids[start : start + block]).astype(np.float64)
        total = rows.sum(0) if total is None else total + rows.sum(0)
    return int(nearest_training((total / len(ids))[None], bank, ids)[0])


def overlap(test: np.ndarray, train: np.ndarray) -> dict[str, Any]:
    """Quantiles of each test row's largest cosine similarity to any training row."""
    _, sims = decode.nearest_rows(np.asarray(test, np.float64), np.asarray(train, np.float64))
    best = sims[:, 0]
    return {"max_cosine_quantiles": {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(best, QUANTILES))},
            "mean": float(best.mean()), "n_test": int(len(test)), "n_train": int(len(train)), "space": "image_embeds"}


def score_lookup(gt, found: np.ndarray, brick, clip, test_ids: np.ndarray, retrieval_target: str,
                 **protocol: Any) -> dict[str, Any]:
    """The run's protocol on the stimuli of training rows ``found`` (one per test image), with intervals."""
    rec = LazyRows(lambda ids: decode.take_rows(brick, ids), found)  # batches, as evaluate reads them
    per_image: intervals.PerImage = {}
    brain = image = None
    if retrieval_target in clip:
        brain, image = decode.take_rows(clip[retrieval_target], found), decode.take_rows(clip[retrieval_target], test_ids)
    results = metrics.evaluate(gt, rec, brain=brain, image=image, per_image=per_image, **protocol)
    out: dict[str, Any] = {"reconstruction": {}, "retrieval": {}}
    for name, value in results.items():
        if name == "n_images" or isinstance(value, dict):
            continue
        section, key = intervals.metric_path(name)
        out[section][key] = value
    out["unavailable"] = {k: v["unavailable"] for k, v in results.items() if isinstance(v, dict)}
    draws = intervals.group_draws(per_image, len(test_ids), bootstrap.DRAWS, bootstrap.SEED)
    out["ci95"] = intervals.nest({k: bootstrap.percentile_ci(v) for k, v in draws.items()})
    return out


def group_baselines(preds, test_ids: np.ndarray, train_ids: np.ndarray, clip, data: Dataset, *, target: str,
                    retrieval_target: str, **protocol: Any) -> dict[str, Any]:
    """The baselines of one subject's predictions."""
    if f"test/{target}" not in preds or target not in clip:
        return {"unavailable": f"the run predicted no {target} or the cache lacks it"}
    near = nearest_training(preds[f"test/{target}"][...], clip[target], train_ids)
    prior = np.full(len(test_ids), category_prior(clip[target], train_ids))
    out: dict[str, Any] = {"target": target, "n_train": int(len(train_ids))}
    protocol["pool"] = min(protocol.get("pool", 300), len(test_ids))
    with data.stimuli() as brick:
        gt = LazyRows(lambda ids: decode.take_rows(brick, ids), test_ids)
        for name, found in (("nearest_training_image", near), ("category_prior", prior)):
            out[name] = score_lookup(gt, found, brick, clip, test_ids, retrieval_target, **protocol)
    out["category_prior"]["image_id"] = int(prior[0])
    if "image_embeds" in clip:
        out["train_test_overlap"] = overlap(decode.take_rows(clip["image_embeds"], test_ids),
                                            decode.take_rows(clip["image_embeds"], np.sort(train_ids)))
    return out


def run_baselines(run: Path, info: RunInfo, groups, data: Dataset, *, retrieval_target: str,
                  **protocol: Any) -> dict[str, Any]:
    """``baselines`` of a run (per subject for a multi-subject run, their mean at the top), with the
    stimuli of ``data``, the run's dataset."""
    clip_path = Path(info.clip)
    if not clip_path.exists():
        return {"unavailable": f"CLIP cache of the run not found: {clip_path}"}
    decoded = run / "decode.json"
    target = (json.loads(decoded.read_text()).get("target") if decoded.is_file() else None) or "image_embeds"
    stores = info.stores()
    per = {}
    for key, (preds, test_ids) in groups.items():
        try:
            train_ids = np.unique(row_ids(open_existing(stores[key], "fMRI store of the run"), "train"))
        except UserError as exc:
            per[key] = {"unavailable": str(exc)}
            continue
        clip = open_cache(clip_path, rows=np.union1d(train_ids, test_ids))
        per[key] = group_baselines(preds, test_ids, train_ids, clip, data, target=target,
                                   retrieval_target=retrieval_target, **protocol)
    if None in per:
        return per[None]
    return {"subjects": per, **metrics.mean_report(list(per.values()))}
