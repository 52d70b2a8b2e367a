"""evaluate over a decoded run folder: the MindEye2 protocol (:func:`pipeline.evaluation.metrics.evaluate`)
and the BrainCLIP tasks -> ``runs/<exp>/metrics.json`` and DVC plot data.

``metrics.json`` says what each number measures: ``retrieval`` names the space the top-1 retrieval
was computed in (``retrieval_target``, flattened: pooled ``image_embeds`` by default; MindEye1 used
ViT-L/14's 257x768 ``layers/24_proj``, MindEye2 ViT-bigG/14's 256x1664 tokens) and which published
column it is comparable to; ``brainclip.zero_shot`` is COCO-category decoding over the categories of
the test images, all seen in training, and ``brainclip.zero_shot_heldout`` BrainCLIP's protocol:
categories held out at fit time (``holdout_categories``), scored on the test images that contain
them, ranking the held-out categories only.

A multi-subject run is scored subject by subject (``subjects.subjNN``, from ``recon/subjNN/``); the
top-level numbers are their mean, the convention of the published tables (subjects 1, 2, 5, 7).
``drop_rois`` scores the run's saved model again with those ROIs removed
(:mod:`pipeline.fitting.rerun`), into ``drop_rois.<name>`` (per-target scores, retrieval pool of all
test images).

The run (predictions, reconstructions) and the stimuli are required; everything else is optional
and degrades to ``{"unavailable": reason}``, listed under ``unavailable`` too: a metric's network
weights, the run's CLIP cache (retrieval, BrainCLIP tasks), the COCO ``instances_*.json`` files or
the CLIP model's weights (zero-shot categories). ``metrics.json`` also records the decoder the
reconstructions came from (``decode.json``). A GOD run (its stores record ``dataset: god``) is scored
with GOD's zero-shot protocol instead (:mod:`.god_run`). Images are read and scored in batches.

Every metric gets a 95 % bootstrap interval over test images (``ci95``, same key paths; ``bootstrap``
records draws, unit and seed) and the per-image scores behind it go to ``per_image.npz``, which
``compare`` reads (:mod:`.intervals`). ``baselines`` scores two training-image lookups the same way
(:mod:`.baselines`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..data.dataset import Dataset
from ..data.registry import given_root, run_dataset
from ..decoding import decode
from ..decoding.run import open_run
from ..device import resolve_device
from ..errors import UserError
from ..features.cache import load_cache_model, open_cache
from ..fitting.run_folder import RunInfo
from ..store import LazyRows, write_text
from . import baselines, intervals, metrics


def evaluate_run(
    run: Path | str, root: Path | str | None = None, *, nsd_root: Path | str | None = None,
    dataset: str | None = None, weights: dict[str, str] | None = None, device: str = "auto",
    pool: int = 300, draws: int = 30, seed: int = 42, retrieval_target: str = "image_embeds",
    drop_rois: list[str] | None = None,
) -> dict[str, Any]:
    """MindEye2-protocol metrics of a decoded run -> ``metrics.json`` (and ``plots/targets.json``).

    ``root``: the root of the run's dataset (``nsd_root``: its alias), named by ``dataset`` or by
    the run's fMRI stores (:func:`pipeline.data.registry.run_dataset`).
    """
    device = str(resolve_device(device))
    run = Path(run)
    info, groups = open_run(run)
    data = run_dataset(info.stores().values(), given_root(root, nsd_root), dataset)
    if data.name == "god":  # zero-shot classification among held-out classes; no reconstructions
        from .god_run import evaluate_god_run

        if drop_rois:
            raise UserError("--drop-rois: a GOD run is scored by zero-shot classification, which has no ROI variant")

        return evaluate_god_run(run, info, groups, device)
    if not (run / "recon").is_dir():
        raise UserError(f"{run}: no recon/ folder; run decode first")
    dropped = None
    if drop_rois:
        from ..fitting.rerun import dropped_voxels

        dropped = dropped_voxels(info.stores(), drop_rois)  # unknown names fail before anything is written
    fit = json.loads((run / "fit_report.json").read_text()) if (run / "fit_report.json").is_file() else {}
    scored, per_image = {}, {}
    for key, (preds, test_ids) in groups.items():
        per_image[key] = {}
        targets = fit.get("targets", {}) if key is None else fit.get("subjects", {}).get(key, {}).get("targets", {})
        scored[key] = _evaluate_group(info, preds, test_ids, run / "recon" if key is None else run / "recon" / key,
                                      data, targets, weights=weights, device=device, pool=pool, draws=draws,
                                      seed=seed, retrieval_target=retrieval_target, per_image=per_image[key])
    if None in scored:
        out = scored[None]
    else:
        out = {"method": info.method, "subjects": scored,
               **{k: v for k, v in metrics.mean_report(list(scored.values())).items() if k != "subjects"}}
        out["retrieval"] = {**scored[next(iter(scored))]["retrieval"], **out.get("retrieval", {})}
        out["unavailable"] = scored[next(iter(scored))]["unavailable"]
    size = image_metrics_size(data)
    if size is not None:
        out["image_metrics_size"] = size
    out["decoder"] = (json.loads((run / "decode.json").read_text()) if (run / "decode.json").is_file()
                      else {"unavailable": f"no {run / 'decode.json'}"})
    test_ids = {key: ids for key, (_, ids) in groups.items()}
    intervals.add_intervals(out, per_image, test_ids)
    intervals.write_per_image(run / "per_image.npz", intervals.flatten(per_image, test_ids))
    out["baselines"] = baselines.run_baselines(run, info, groups, data, retrieval_target=retrieval_target,
                                               weights=weights, device=device, pool=pool, draws=draws, seed=seed)
    if dropped is not None:
        out["drop_rois"] = {name: _score_without(run, info, groups, {k: d[name] for k, d in dropped.items()})
                            for name in drop_rois}
    write_text(run / "metrics.json", json.dumps(out, indent=2))
    write_text(run / "plots" / "targets.json", json.dumps(
        [{"target": t, **{k: v for k, v in r.items() if isinstance(v, float)}} for t, r in out["targets"].items()],
        indent=2))
    return out


def image_metrics_size(data: Dataset) -> dict[str, Any] | None:
    """At which size PixCorr/SSIM were computed, for a dataset whose images are published at another
    size than NSD's 425 px (MindEye2's 224, MindEye1's 256); None for the others."""
    if data.image_size in (None, metrics.PIXEL_SIZE):
        return None
    with data.stimuli() as brick:
        native = int(brick.shape[1])
    return {"PixCorr_SSIM_px": metrics.PIXEL_SIZE, "ground_truth_px": native,
            "detail": f"the {data.name} ground truth is {native} px, resized to {metrics.EVAL_SIZE} then "
            f"{metrics.PIXEL_SIZE} px (the protocol's size, defined on NSD's 425-px images): not comparable "
            "with PixCorr/SSIM published on 425-px ground truth"}


def _score_without(run: Path, info: RunInfo, groups, drop: dict) -> dict[str, Any]:
    """Per-target scores of the run's model on each subject's test set with ``drop`` voxels removed."""
    from ..fitting.pairs import true_targets
    from ..fitting.rerun import predict_without
    from ..fitting.run_folder import target_report

    clip = open_cache(Path(info.clip))
    per = {}
    for key, (_, test_ids) in groups.items():
        preds = predict_without(run, info, key, drop[key])
        per[key] = {"dropped_voxels": int(drop[key].sum()),
                    "targets": {name: target_report(p, true_targets(clip, name, test_ids, p.shape[1:]))
                                for name, p in preds.items() if len(p) >= 2}}
    if None in per:
        return per[None]
    return {"subjects": per, **metrics.mean_report(list(per.values()))}


def _evaluate_group(info: RunInfo, preds: zarr.Group, test_ids: np.ndarray, recon: Path, data: Dataset,
                    targets: dict, *, weights, device: str, pool: int, draws: int, seed: int,
                    retrieval_target: str, per_image: dict | None = None) -> dict[str, Any]:
    """The metrics of one subject's predictions and reconstructions."""
    missing = [int(i) for i in test_ids if not (recon / decode.recon_name(i)).is_file()]
    if missing:
        raise UserError(f"{recon}: no reconstruction of {len(missing)} test images (first: "
                        f"{decode.recon_name(missing[0])}); run decode again")
    unavailable: dict[str, str] = {}
    clip = run_cache(info, test_ids)
    retrieval: dict[str, Any] = {"space": retrieval_target}
    brain = image = None
    if isinstance(clip, str):
        unavailable.update(dict.fromkeys(("retrieval_image_to_brain", "retrieval_brain_to_image"), clip))
    else:
        retrieval = retrieval_space(clip, retrieval_target)
        if f"test/{retrieval_target}" in preds:
            if retrieval_target not in clip:
                raise UserError(f"evaluate.retrieval_target {retrieval_target!r} is not an array of {info.clip}")
            brain = preds[f"test/{retrieval_target}"][...]
            image = decode.take_rows(clip[retrieval_target], test_ids)
        else:
            unavailable.update(dict.fromkeys(("retrieval_image_to_brain", "retrieval_brain_to_image"),
                                             f"the run predicted no {retrieval_target}"))
    n = len(test_ids)
    with data.stimuli() as brick:
        gt = LazyRows(lambda ids: decode.take_rows(brick, ids), test_ids)
        rec = LazyRows(lambda ids: decode.read_reconstructions(recon, ids), test_ids)
        results = metrics.evaluate(gt, rec, brain=brain, image=image, weights=weights, device=device,
                                   pool=min(pool, n), draws=draws, seed=seed, per_image=per_image)
    results.update({k: {"unavailable": v} for k, v in unavailable.items()})
    brainclip = brainclip_tasks(preds, info, data, test_ids, device, pool=min(pool, n), draws=draws, seed=seed,
                                per_image=per_image)
    missing = {k: v["unavailable"] for k, v in {**results, **brainclip}.items() if isinstance(v, dict) and "unavailable" in v}
    for key in ("retrieval_image_to_brain", "retrieval_brain_to_image"):
        retrieval[key.removeprefix("retrieval_")] = results.pop(key)
    numbers = {k: v for k, v in results.items() if not isinstance(v, dict)}
    return {"method": info.method, "retrieval_pool": min(pool, n), "reconstruction": numbers,
            "retrieval": retrieval, "brainclip": brainclip, "targets": targets, "unavailable": missing}


def run_cache(info: RunInfo, test_ids: np.ndarray) -> zarr.Group | str:
    """The run's CLIP cache, checked to hold every test row; the reason it is unavailable when it
    is gone (a cache that exists but misses test rows is refused: its numbers would be wrong)."""
    path = Path(info.clip)
    if not path.exists():
        return f"CLIP cache of the run not found: {path}"
    return open_cache(path, rows=test_ids)


def retrieval_space(clip: zarr.Group, target: str) -> dict[str, Any]:
    """What retrieval was computed on, and the published retrieval column it can sit under."""
    model = clip.attrs.get("model", "?")
    layer = (clip.attrs.get("layers") or {}).get(target.removeprefix("layers/"), {})
    n_blocks = ((clip.attrs.get("settings") or {}).get("model_config") or {}).get("vision_cfg", {}).get("layers")
    if target == "image_embeds":
        comparable = ("none: MindEye1 retrieved with ViT-L/14's 257x768 layers/24_proj tokens, MindEye2 with "
                      "ViT-bigG/14's 256x1664 tokens; pooled embeddings are an easier, different space")
    elif layer.get("projected") and layer["blocks"] == [n_blocks] and model.startswith("ViT-L-14"):
        comparable = "MindEye1's Img ret / Brain ret (ViT-L/14 last block -> ln_post -> proj, 257x768, flattened)"
    else:
        comparable = "none (no published method retrieves in this space)"
    shape = list(clip[target].shape[1:]) if target in clip else None
    return {"space": target, "model": model, "row_shape": shape, "flattened": True,
            "directions": "image_to_brain = MindEye2 code's fwd, brain_to_image = bwd", "comparable_to": comparable}


def brainclip_tasks(preds: zarr.Group, info: RunInfo, data: Dataset, test_ids: np.ndarray, device: str, *,
                    pool: int, draws: int, seed: int, per_image: dict | None = None) -> dict[str, Any]:
    """Zero-shot category decoding (class-name prompts through the cache's own CLIP text tower)
    from predicted ``image_embeds`` (all test images and categories; and, when the run held
    categories out at fit time, BrainCLIP's held-out protocol), and fMRI->text retrieval from
    predicted ``text_embeds``; ``per_image`` receives what the bootstrap resamples (``brainclip/...``)."""
    from .zeroshot import caption_targets, class_embeddings, zero_shot_accuracy

    out: dict[str, Any] = {}
    store = run_cache(info, test_ids)
    if isinstance(store, str):
        return {k: {"unavailable": store} for k in ("zero_shot", "fmri_to_text_top1")}
    held = list(info.extra.get("holdout_categories") or [])
    if "test/image_embeds" in preds:
        try:
            names, labels = data.categories(test_ids)
            loaded = load_cache_model(store.attrs, device)
        except UserError as exc:  # no categories in the dataset (NSD: no COCO instances files), no CLIP weights
            out["zero_shot"] = {"unavailable": str(exc)}
        else:
            classes = class_embeddings(loaded, names, device=device)
            pred = preds["test/image_embeds"][...]
            hits: dict[str, np.ndarray] = {}
            out["zero_shot"] = zero_shot_accuracy(pred, classes, labels, topk=[k for k in (1, 5) if k <= len(names)],
                                                  hits=hits)
            if per_image is not None:
                per_image.update({f"brainclip/zero_shot/{k}": {"scores": v} for k, v in hits.items()})
            out["zero_shot"]["chance_top1"] = float(labels.sum(1).mean() / len(names))
            out["zero_shot"]["protocol"] = (
                "COCO categories of the test images, ranked among all of them; categories seen in training"
                + (f" except the held-out {held}" if held else ""))
            if held:
                out["zero_shot_heldout"] = heldout_zero_shot(pred, classes, labels, names, held)
    if "test/text_embeds" in preds:
        if "text_embeds" not in store:
            out["fmri_to_text_top1"] = {"unavailable": f"{info.clip} has no text_embeds (extract-clip --captions)"}
        else:
            truth = caption_targets(decode.take_rows(store["text_embeds"], test_ids))
            pred = preds["test/text_embeds"][...]
            if pred.ndim == 3:  # a per-caption prediction (ridge on the (n, K, D) array): reduce it like the truth
                pred = caption_targets(pred)
            ret = metrics.retrieval_top1(pred, truth, pool=pool, draws=draws, seed=seed)
            out["fmri_to_text_top1"] = ret.brain_to_image
            if per_image is not None:
                per_image["brainclip/fmri_to_text_top1"] = {
                    "fail": metrics.retrieval_failures(pred, truth).brain_to_image, "pool": pool}
    return out


def heldout_zero_shot(pred: np.ndarray, classes: np.ndarray, labels: np.ndarray, names: list[str],
                      held: list[str]) -> dict[str, Any]:
    """BrainCLIP's zero-shot protocol: test images that show a held-out category, ranked among the
    held-out categories only (none of them was in a training image)."""
    from .zeroshot import zero_shot_accuracy

    cols = [names.index(c) for c in held if c in names]
    if not cols:
        return {"unavailable": f"no test image shows a held-out category {held}"}
    rows = labels[:, cols].any(1)
    result = zero_shot_accuracy(pred[rows], classes[cols], labels[rows][:, cols],
                                topk=[k for k in (1, 5) if k <= len(cols)])
    result["chance_top1"] = float(labels[rows][:, cols].sum(1).mean() / len(cols))
    result["categories"] = [names[c] for c in cols]
    result["protocol"] = ("BrainCLIP: categories held out at fit time (no training image shows them); test "
                          "images showing one, ranked among the held-out categories")
    return result
