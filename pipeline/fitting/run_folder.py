"""The run folder fit-adapters writes and every later stage reads: its ``run.json`` schema
(:class:`RunInfo`, one writer, one reader) and the prediction/report files.

``run.json`` keys, single-subject: ``method, fmri, clip, subject, targets, params, clip_model,
package_version`` then the method's own facts (ridge: ``input_voxels, rois, alphas``; trained:
``n_params, parameter_counts, best_epoch, ...``; ``holdout_categories``). Multi-subject: ``method,
clip, targets, params, clip_model, package_version, multi_subject, subjects, fmri`` (one store per
subject) then the rest (``fmri_settings, clip_identity, align, trained, init, ...``). The facts
beyond the shared fields are kept as :attr:`RunInfo.extra`, in the order they were written.

``predictions.zarr`` holds one row per unique test image (:func:`per_image`), ``fit_report.json``
each target's :func:`target_report`; a multi-subject run has one group per subject in both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .. import __version__
from ..errors import UserError
from ..store import compressor, read_json
from . import scores
from .adapters.subjects import subject_key
from .pairs import Pairs, true_targets

RUN_FILE, REPORT_FILE, PREDICTIONS = "run.json", "fit_report.json", "predictions.zarr"


@dataclass
class RunInfo:
    """``run.json``: what a run fitted, from which stores; see the module docstring."""

    method: str
    clip: str
    targets: list[str]
    params: dict[str, Any]
    fmri: str | list[str]
    clip_model: str | None = None
    subject: int | None = None
    subjects: list[int] | None = None  # a multi-subject run: its subjects, one fMRI store each
    extra: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__

    @property
    def multi_subject(self) -> bool:
        return self.subjects is not None

    def stores(self) -> dict[str | None, Path]:
        """The fMRI store of each subject (key ``subjNN``; None for a single-subject run)."""
        if self.subjects is not None:
            return {subject_key(s): Path(p) for s, p in zip(self.subjects, self.fmri, strict=True)}
        return {None: Path(self.fmri)}

    def to_json(self) -> dict[str, Any]:
        """The ``run.json`` document (key order as fit-adapters has always written it)."""
        shared = {"targets": self.targets, "params": self.params, "clip_model": self.clip_model,
                  "package_version": self.package_version}
        if self.subjects is None:
            return {"method": self.method, "fmri": self.fmri, "clip": self.clip, "subject": self.subject,
                    **shared, **self.extra}
        return {"method": self.method, "clip": self.clip, **shared, "multi_subject": True,
                "subjects": self.subjects, "fmri": self.fmri, **self.extra}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = RUN_FILE) -> RunInfo:
        doc = dict(doc)
        try:
            fields = {k: doc.pop(k) for k in ("method", "clip", "targets", "params", "fmri")}
        except KeyError as exc:
            raise UserError(f"{where}: no {exc.args[0]!r}; was it written by fit-adapters?") from None
        multi = doc.pop("multi_subject", False)
        subjects = doc.pop("subjects", None) if multi else None
        optional = {k: doc.pop(k) for k in ("clip_model", "subject", "package_version") if k in doc}
        return cls(**fields, **optional, subjects=subjects, extra=doc)


def write_run_info(run: Path, info: RunInfo) -> None:
    """Write ``run/run.json``."""
    (Path(run) / RUN_FILE).write_text(json.dumps(info.to_json(), indent=2, default=str))


def read_run_info(run: Path | str, what: str | None = None) -> RunInfo:
    """``run/run.json``; ``what`` names the run in the error (default: the folder)."""
    path = Path(run) / RUN_FILE
    if not path.is_file():
        raise UserError(f"{what or run}: no {RUN_FILE}; is it a run folder written by fit-adapters?")
    return RunInfo.from_json(read_json(path), str(path))


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


def _write_group(root: zarr.Group, prefix: str, pairs: Pairs, predictions: Mapping[str, np.ndarray],
                 row_key: str) -> dict[str, Any]:
    """One subject's per-image predictions under ``prefix`` + their report (n_test, n_test_rows, targets)."""
    test_ids, n_repeats, preds = per_image(pairs.image_ids("test"), predictions)
    report: dict[str, Any] = {"n_test": int(len(test_ids)), "n_test_rows": int(n_repeats.sum()), "targets": {}}
    for name, pred in preds.items():
        root.create_array(f"{prefix}test/{name}", data=pred, chunks=(max(1, min(len(pred), 256)), *pred.shape[1:]),
                          compressors=[compressor()])
        if len(pred) >= 2:
            report["targets"][name] = target_report(pred, true_targets(pairs.clip, name, test_ids, pred.shape[1:]))
    root.create_array(f"{prefix}test/{row_key}", data=test_ids)
    root.create_array(f"{prefix}test/n_repeats", data=n_repeats)
    return report


def run_info(method: str, pairs: Pairs, params: Mapping[str, Any], extra: Mapping[str, Any]) -> RunInfo:
    """The run.json of a single-subject run on ``pairs``."""
    return RunInfo(method=method, clip=str(pairs.clip_path), targets=pairs.targets, params=dict(params),
                   fmri=str(pairs.fmri_path), clip_model=pairs.clip.attrs.get("model"), subject=pairs.subject,
                   extra=dict(extra))


def write_outputs(run: Path, pairs: Pairs, info: RunInfo, predictions: Mapping[str, np.ndarray]) -> dict:
    """A single-subject run's ``predictions.zarr``, ``fit_report.json`` and ``run.json``; returns the report."""
    root = zarr.open_group(run / PREDICTIONS, mode="w", zarr_format=3)
    group = _write_group(root, "", pairs, predictions, pairs.row_key)
    report = {"method": info.method, **group}
    root.attrs.update({"method": info.method, "fmri": str(pairs.fmri_path), "clip": str(pairs.clip_path)})
    write_run_info(run, info)
    (run / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def write_subject_outputs(run: Path, cohort: Sequence[Pairs], info: RunInfo,
                          predictions: Mapping[int, Mapping[str, np.ndarray]]) -> dict:
    """A multi-subject run's ``predictions.zarr`` (one group per subject), ``fit_report.json`` (per
    subject and their mean) and ``run.json``."""
    root = zarr.open_group(run / PREDICTIONS, mode="w", zarr_format=3)
    per_subject = {}
    for pairs in cohort:
        key = subject_key(pairs.subject)
        per_subject[key] = _write_group(root, f"{key}/", pairs, predictions[pairs.subject], "image_ids")
        root[key].attrs.update({"subject": pairs.subject, "fmri": str(pairs.fmri_path)})
    root.attrs.update({"method": info.method, "subjects": list(per_subject), "clip": str(cohort[0].clip_path)})
    fit_report = {"method": info.method, "subjects": per_subject, **scores.mean_report(list(per_subject.values()))}
    write_run_info(run, info)
    (run / REPORT_FILE).write_text(json.dumps(fit_report, indent=2))
    return fit_report
