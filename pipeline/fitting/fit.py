"""fit-adapters: train one stage-2 method on an fMRI cache + CLIP cache and predict the test set.

Writes ``runs/<exp>/``::

    run.json              what was fitted: method, stores, targets, input voxels, parameters
    adapters/<method>/    the fitted adapter (safetensors + JSON config; reloads on its own)
    predictions.zarr      test/<target> (n_images, ...) float32, test/image_ids (test/clip_ids for a
                          video cache) and test/n_repeats:
                          one row per unique test image, sorted by id; when the fMRI store has a
                          row per trial, the predictions of an image's trials are averaged
                          (MindEye2's test protocol), so no metric sees a repeat as a distractor
    fit_report.json       per target: Pearson r / cosine, two-way identification and top-1
                          retrieval of predicted vs true targets among the test images
    timings.json          trained methods: wall-clock seconds (the only file that differs
                          between two identical runs; not a DVC output)

The run folder is assembled under ``<exp>.tmp-<pid>`` and swapped in when complete
(:func:`pipeline.store.atomic_dir`), so an interrupted fit never leaves a run that looks finished
and a rerun never leaves a moment without one. Trained methods keep their per-epoch checkpoints in
``<exp>.checkpoints/`` so a rerun (after Ctrl-C or ``kill -9``) resumes to the same weights; they
are removed after success.

Several subjects (a list of fMRI stores), ``align``, ``experts`` or ``init`` make it one multi-subject
model (:mod:`.fit_subjects`), with one group per subject in the outputs. Under ``torchrun`` every
process trains (:mod:`.distributed`) and process 0 alone writes the run folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .. import __version__
from ..device import resolve_device
from ..errors import UserError
from ..store import atomic_dir, compressor, write_timings
from .adapters.base import make_config, roi_indices
from . import scores
from .pairs import Pairs, open_pairs, true_targets

METHODS = ("ridge", "mclip", "litemind", "perception")
RIDGE_KEYS = ("alphas", "cv", "alpha_per", "rescale", "n_targets_batch", "backend", "coef_dtype")


def fit_adapters(
    fmri: Path | str | Sequence[Path | str],
    clip: Path | str,
    method: str,
    out: Path | str,
    *,
    targets: Sequence[str] | None = None,
    rois: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    train: Mapping[str, Any] | None = None,
    subject: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    holdout_categories: Sequence[str] | None = None,
    nsd_root: Path | str | None = None,
    align: str | None = None,
    experts: int | None = None,
    init: Path | str | None = None,
    finetune: str | None = None,
    subjects: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit ``method`` and write the run folder; returns the fit report.

    ``targets``: CLIP-cache arrays to predict. Ridge: any list (default ``image_embeds``).
    litemind: its ``targets``. mclip: ``detail, semantic[, text]`` in that order (default from
    ``params``). ``rois``: ridge input voxels (labels > 0 in any of these ``voxels/<roi>``
    arrays; default every nsdgeneral voxel); the trained methods take ROIs from ``params``.
    ``params``: the method's settings (ridge: alphas, cv, alpha_per, rescale, ...; mclip/litemind:
    fields of their config dataclass). ``train``: :class:`pipeline.fitting.train.TrainConfig` fields.
    ``holdout_categories``: COCO category names (read from ``nsd_root``) no training image may show:
    those trials are left out of the fit, for BrainCLIP's held-out zero-shot protocol in evaluate.
    ``fmri`` as a list of stores, ``align`` (voxels | roi), ``experts``, ``init`` (a pre-trained
    multi-subject run) and ``finetune`` (all | lora | skip-lora) fit one multi-subject model
    (:mod:`.fit_subjects`); ``subjects``: :class:`.adapters.subjects.SubjectConfig` fields.
    """
    from .distributed import is_main

    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    resolve_device(device)  # a device this machine lacks fails before any work
    out = Path(out)
    params = dict(params or {})
    stores = [fmri] if isinstance(fmri, (str, Path)) else list(fmri)
    if len(stores) > 1 or align is not None or experts or init is not None or finetune is not None:
        return _fit_several(stores, clip, method, out, targets, rois, params, train, subject, seed, device, progress,
                            holdout_categories, align, experts, init, finetune, subjects)
    if subjects:
        raise UserError("subjects settings apply to multi-subject runs (several --fmri stores, --align or --init)")
    fmri = stores[0]
    if method == "ridge" and not is_main():
        return {}  # a closed-form fit: one process does it
    if method == "ridge":
        pairs = open_pairs(fmri, clip, list(targets or ["image_embeds"]), subject)
    else:
        if rois:
            raise UserError(f"--rois applies to ridge; set the ROI fields of {method} in params instead")
        params = _trained_targets(method, params, targets)
        from .models import adapter_targets

        pairs = open_pairs(fmri, clip, adapter_targets(method, params), subject)
    keep, held = _holdout_rows(pairs, holdout_categories, nsd_root)
    checkpoints = out.with_name(f"{out.name}.checkpoints")
    with _run_folder(out) as tmp:
        if method == "ridge":
            predictions, info = _fit_ridge(pairs, tmp, rois, params, seed, device, progress, keep)
        else:
            predictions, info = _fit_trained(pairs, method, tmp, params, train, seed, device, progress, checkpoints, keep)
        if not is_main():
            return {}
        info.update(held)
        report = _write_outputs(tmp, pairs, method, predictions, info, params)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return report


@contextmanager
def _run_folder(out: Path) -> Iterator[Path]:
    """The run folder being assembled: atomic on the main process, a scratch folder on the others."""
    from .distributed import is_main

    if is_main():
        with atomic_dir(out) as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix="fit-rank-") as tmp:
            yield Path(tmp)


def _fit_several(stores, clip, method, out, targets, rois, params, train, subject, seed, device, progress,
                 holdout_categories, align, experts, init, finetune, subjects) -> dict[str, Any]:
    from .distributed import is_main
    from .fit_subjects import fit_subjects

    if rois:
        raise UserError("--rois applies to single-subject ridge fits")
    if subject is not None:
        raise UserError("--subject checks a single-subject store; a multi-subject run takes each store's own subject")
    if holdout_categories:
        raise UserError("holdout_categories is not supported for multi-subject runs yet; fit one subject")
    settings = dict(subjects or {})
    if align is not None:
        settings["align"] = align
    if experts is not None:
        settings["experts"] = experts
    params = _trained_targets(method, params, targets) if method != "ridge" else params
    checkpoints = out.with_name(f"{out.name}.checkpoints")
    with _run_folder(out) as tmp:
        report = fit_subjects(stores, clip, method, tmp, checkpoints, params=params, train=train, subjects=settings,
                              init=init, finetune=finetune, seed=seed, device=device, progress=progress,
                              is_main=is_main())
    if is_main():
        shutil.rmtree(checkpoints, ignore_errors=True)
    return report


def _trained_targets(method: str, params: dict[str, Any], targets: Sequence[str] | None) -> dict[str, Any]:
    if not targets:
        return params
    if method == "litemind":
        return {**params, "targets": list(targets)}
    if method == "perception":
        if len(targets) != 1:
            raise UserError("--targets for perception: one video-cache array (frames or frame_latents)")
        return {**params, "target": targets[0]}
    if len(targets) not in (2, 3):
        raise UserError("--targets for mclip: detail,semantic[,text] (e.g. layers/11-20_mean,image_embeds)")
    keys = ("detail_target", "semantic_target", "text_target")
    return {**params, **dict(zip(keys, targets))}


def _holdout_rows(
    pairs: Pairs, categories: Sequence[str] | None, nsd_root: Path | str | None
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Training rows whose image shows none of ``categories`` (None: all rows), and what run.json records."""
    if not categories:
        return None, {}
    if nsd_root is None:
        raise UserError("holdout_categories needs the NSD root (fit_adapters.nsd_root) for the COCO categories")
    from ..data.nsd import NSD
    from ..data.coco import coco_categories

    names, hot = coco_categories(NSD(nsd_root), pairs.image_ids("train"))
    unknown = [c for c in categories if c not in names]
    if unknown:
        raise UserError(f"holdout_categories: no COCO category {unknown[0]!r} in the training images "
                        f"(known: {', '.join(names)})")
    keep = ~hot[:, [names.index(c) for c in categories]].any(1)
    if not keep.any():
        raise UserError(f"holdout_categories {list(categories)}: every training image shows one of them")
    return keep, {"holdout_categories": list(categories), "heldout_train_trials": int((~keep).sum())}


def _fit_ridge(pairs: Pairs, run: Path, rois, params, seed, device, progress, keep=None) -> tuple[dict, dict]:
    from .adapters.ridge import RidgeAdapter

    unknown = sorted(set(params) - set(RIDGE_KEYS))
    if unknown:
        raise UserError(f"unknown ridge parameter(s) {unknown} (known: {', '.join(RIDGE_KEYS)})")
    voxels = {n: pairs.fmri[f"voxels/{n}"] for n in pairs.fmri["voxels"].array_keys()} if "voxels" in pairs.fmri else None
    X_train = pairs.betas("train")
    idx = roi_indices(voxels, rois, X_train.shape[1])
    ids = pairs.image_ids("train")
    if keep is not None:
        X_train, ids = X_train[keep], ids[keep]
    adapter = RidgeAdapter(**params, device=device, seed=seed, progress=progress)
    adapter.fit(
        X_train[:, idx], {t: pairs.target(t) for t in pairs.targets}, groups=ids, rows=ids,
        out=run / "adapters" / "ridge",
    )
    preds = adapter.predict(pairs.betas("test")[:, idx])
    alphas = {t: _alpha_summary(adapter.alpha(t)) for t in pairs.targets}
    return preds, {"input_voxels": idx.tolist(), "rois": list(rois or []), "alphas": alphas}


def _alpha_summary(alpha: np.ndarray) -> dict[str, float]:
    return {"median": float(np.median(alpha)), "min": float(alpha.min()), "max": float(alpha.max())}


def _fit_trained(pairs: Pairs, method, run: Path, params, train, seed, device, progress, checkpoints: Path, keep=None):
    from .data import CacheDataset
    from .distributed import is_main, teardown
    from .models import build_adapter, load_adapter, predict, save_adapter
    from .train import TrainConfig
    from .train import train as train_loop

    cfg = make_config(TrainConfig, {"seed": seed, "device": device, "progress": progress, **dict(train or {}),
                                    "checkpoint_dir": str(checkpoints)}, "train")
    voxels = pairs.fmri["voxels"] if "voxels" in pairs.fmri else None
    memory = None if cfg.memory_gb is None else int(cfg.memory_gb * 1e9)
    rows = slice(None) if keep is None else keep  # held-out trials are never loaded
    data = CacheDataset(pairs.betas("train")[rows], pairs.image_ids("train")[rows], pairs.clip, pairs.targets, voxels,
                        name=f"{pairs.fmri_path} train", memory=memory, progress=progress)
    model = build_adapter(method, params, data, seed=seed)
    result = train_loop(model, data, cfg)
    teardown()  # the last collective is behind: process 0 alone goes on, nobody waits for it
    if not is_main():
        return None, {}
    write_timings(run, {**result.timings(), "targets_read": data.bank.describe(), "target_reads": data.bank.reads.summary()})
    folder = save_adapter(run / "adapters" / method, model, extra={"train": result.record()})
    reloaded = load_adapter(folder)  # predictions come from what was saved
    preds = predict(reloaded, pairs.betas("test"))
    return preds, {"n_params": model.n_params, "parameter_counts": model.parameter_counts(),
                   "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                   "resumed_from": result.resumed_from}


def target_report(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Predicted vs true test targets: quality, two-way identification, n-way top-1 retrieval."""
    n = len(pred)
    flat_p, flat_t = pred.reshape(n, -1), true.reshape(n, -1)
    ret = scores.retrieval_top1(flat_p, flat_t, pool=n, draws=1, seed=0)
    return {
        **scores.prediction_quality(flat_p, flat_t),
        "two_way_identification": scores.two_way_identification(flat_t, flat_p),
        "top1_retrieval": ret.brain_to_image,
        "top1_chance": 1.0 / n,
    }


def per_image(image_ids: np.ndarray, predictions: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(sorted unique ids, rows per id, {name: mean prediction of each id's rows}); a store that is
    already one row per image, sorted, passes through unchanged."""
    images, first, counts = np.unique(image_ids, return_index=True, return_counts=True)
    if len(images) == len(image_ids) and (first == np.arange(len(first))).all():
        return images, counts, {k: np.asarray(v, np.float32) for k, v in predictions.items()}
    order = np.argsort(image_ids, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]

    def mean(v: np.ndarray) -> np.ndarray:
        sums = np.add.reduceat(np.asarray(v, np.float64)[order], starts)
        return (sums / counts.reshape(-1, *[1] * (sums.ndim - 1))).astype(np.float32)

    return images, counts, {k: mean(v) for k, v in predictions.items()}


def _write_outputs(run: Path, pairs: Pairs, method: str, predictions: dict[str, np.ndarray], info: dict, params) -> dict:
    test_ids, n_repeats, predictions = per_image(pairs.image_ids("test"), predictions)
    root = zarr.open_group(run / "predictions.zarr", mode="w", zarr_format=3)
    report: dict[str, Any] = {"method": method, "n_test": int(len(test_ids)), "n_test_rows": int(n_repeats.sum()),
                              "targets": {}}
    for name, pred in predictions.items():
        root.create_array(f"test/{name}", data=pred, chunks=(max(1, min(len(pred), 256)), *pred.shape[1:]),
                          compressors=[compressor()])
        if len(pred) >= 2:
            report["targets"][name] = target_report(pred, true_targets(pairs.clip, name, test_ids, pred.shape[1:]))
    root.create_array(f"test/{pairs.row_key}", data=test_ids)
    root.create_array("test/n_repeats", data=n_repeats)
    root.attrs.update({"method": method, "fmri": str(pairs.fmri_path), "clip": str(pairs.clip_path)})
    run_info = {
        "method": method, "fmri": str(pairs.fmri_path), "clip": str(pairs.clip_path),
        "subject": pairs.subject, "targets": pairs.targets, "params": params,
        "clip_model": pairs.clip.attrs.get("model"), "package_version": __version__, **info,
    }
    (run / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
    (run / "fit_report.json").write_text(json.dumps(report, indent=2))
    return report
