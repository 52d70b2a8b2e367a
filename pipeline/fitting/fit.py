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

import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..device import resolve_device
from ..errors import UserError
from ..store import atomic_dir
from .distributed import is_main
from .fit_subjects import fit_subjects
from .methods import METHODS, FitJob, Method, method_class
from .pairs import Pairs, open_pairs
from .run_folder import run_info, write_outputs


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
    """Fit ``method`` (a name in :data:`.methods.METHODS`) and write the run folder; returns the fit report.

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
    cls = method_class(method)
    resolve_device(device)  # a device this machine lacks fails before any work
    out = Path(out)
    stores = [fmri] if isinstance(fmri, (str, Path)) else list(fmri)
    job = FitJob(seed=seed, device=device, progress=progress, train=train, rois=rois,
                 checkpoints=out.with_name(f"{out.name}.checkpoints"))
    if len(stores) > 1 or align is not None or experts or init is not None or finetune is not None:
        settings = {**dict(subjects or {}), **{k: v for k, v in (("align", align), ("experts", experts)) if v is not None}}
        return _fit_several(stores, clip, cls, out, dict(params or {}), targets, job, subject=subject,
                            holdout_categories=holdout_categories, subjects=settings, init=init, finetune=finetune)
    if subjects:
        raise UserError("subjects settings apply to multi-subject runs (several --fmri stores, --align or --init)")
    if rois and not cls.takes_rois:
        raise UserError(f"--rois applies to {_takes_rois()}; set the ROI fields of {method} in params instead")
    params, read = cls.configure(dict(params or {}), targets)
    if not cls.every_process and not is_main():
        return {}  # e.g. a closed-form fit: one process does it
    pairs = open_pairs(stores[0], clip, read, subject)
    job.keep, held = _holdout_rows(pairs, holdout_categories, nsd_root)
    with _run_folder(out) as tmp:
        job.run = tmp
        model, facts = cls.fit(pairs, tmp / "adapters" / method, params, job)
        if not is_main():
            return {}
        predictions = model.predict(pairs.betas("test"))
        report = write_outputs(tmp, pairs, run_info(method, pairs, params, {**facts, **held}), predictions)
    shutil.rmtree(job.checkpoints, ignore_errors=True)
    return report


def _takes_rois() -> str:
    return ", ".join(n for n, c in METHODS.items() if c.takes_rois)


@contextmanager
def _run_folder(out: Path) -> Iterator[Path]:
    """The run folder being assembled: atomic on the main process, a scratch folder on the others."""
    if is_main():
        with atomic_dir(out) as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix="fit-rank-") as tmp:
            yield Path(tmp)


def _fit_several(stores: list, clip: Path | str, cls: type[Method], out: Path, params: dict[str, Any],
                 targets: Sequence[str] | None, job: FitJob, *, subject: int | None,
                 holdout_categories: Sequence[str] | None, subjects: dict[str, Any], init: Path | str | None,
                 finetune: str | None) -> dict[str, Any]:
    """One multi-subject model with ``cls`` as its trunk (:mod:`.fit_subjects`)."""
    if not cls.trunk:
        raise UserError(f"{cls.name} fits one subject; several --fmri stores, --align, --experts and --init need "
                        f"a trained method ({', '.join(n for n, c in METHODS.items() if c.trunk)})")
    if job.rois:
        raise UserError(f"--rois applies to single-subject fits of {_takes_rois()}")
    if subject is not None:
        raise UserError("--subject checks a single-subject store; a multi-subject run takes each store's own subject")
    if holdout_categories:
        raise UserError("holdout_categories is not supported for multi-subject runs yet; fit one subject")
    params, _ = cls.configure(params, targets)
    with _run_folder(out) as tmp:
        report = fit_subjects(stores, clip, cls, tmp, job, params=params, subjects=subjects, init=init,
                              finetune=finetune)
    if is_main():
        shutil.rmtree(job.checkpoints, ignore_errors=True)
    return report


def _holdout_rows(
    pairs: Pairs, categories: Sequence[str] | None, nsd_root: Path | str | None
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Training rows whose image shows none of ``categories`` (None: all rows), and what run.json records."""
    if not categories:
        return None, {}
    if nsd_root is None:
        raise UserError("holdout_categories needs the dataset's root (fit_adapters.nsd_root) for its categories")
    from ..data.registry import dataset_name, open_dataset

    data = open_dataset(dataset_name(pairs.fmri.attrs), nsd_root)
    names, hot = data.categories(pairs.image_ids("train"))
    unknown = [c for c in categories if c not in names]
    if unknown:
        raise UserError(f"holdout_categories: no category {unknown[0]!r} in the training images "
                        f"(known: {', '.join(names)})")
    keep = ~hot[:, [names.index(c) for c in categories]].any(1)
    if not keep.any():
        raise UserError(f"holdout_categories {list(categories)}: every training image shows one of them")
    return keep, {"holdout_categories": list(categories), "heldout_train_trials": int((~keep).sum())}
