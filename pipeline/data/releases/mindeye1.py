"""MindEye1's release (``pscotti/naturalscenesdataset/webdataset_avg_split``) -> the fMRI store.

Root = the ``webdataset_avg_split/`` folder: ``train/train_subj0X_*.tar``, ``val/val_subj0X_*.tar``,
``test/test_subj0X_*.tar``. One sample per image: ``nsdgeneral.npy`` (3 x V, the session-wise
z-scored repetitions, padded to three rows), ``num_uniques.npy`` (the real repetitions), ``coco73k.npy``
(0-based 73k id), ``trial.npy`` (the global trials of the repetitions, padded like the betas;
unverified for the hosted tars: without one per repetition only ``--repeats mean`` is possible) and a
256-px ``jpg``. Train = train + val; per-trial rows are the first ``num_uniques`` rows only, never the
padding; averaged rows are their mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UserError
from .common import Trials, check_choice, load_npy, require, tar_samples, write_store

SPLITS = {"train": False, "val": False, "test": True}
"""Folder -> is test. MindEye1 trains on train + val."""


def tars(root: Path, subject: int, folder: str) -> list[Path]:
    return sorted((root / folder).glob(f"{folder}_subj{subject:02d}_*.tar"), key=lambda p: (len(p.stem), p.stem))


def read_samples(tar: Path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(73k id, trial ids, betas rows) of each sample: only its ``num_uniques`` real repetitions."""
    out = []
    for key, sample in tar_samples(tar):
        missing = {"nsdgeneral.npy", "num_uniques.npy", "coco73k.npy", "trial.npy"} - set(sample)
        if missing:
            raise UserError(f"{tar}: sample {key!r} lacks {sorted(missing)}")
        where = f"{tar}:{key}"
        betas = np.atleast_2d(load_npy(sample["nsdgeneral.npy"], f"{where}.nsdgeneral.npy"))
        n = int(load_npy(sample["num_uniques.npy"], f"{where}.num_uniques.npy").reshape(-1)[0])
        trial = load_npy(sample["trial.npy"], f"{where}.trial.npy").reshape(-1)
        image = int(load_npy(sample["coco73k.npy"], f"{where}.coco73k.npy").reshape(-1)[0])
        if not 1 <= n <= len(betas):
            raise UserError(f"{where}: num_uniques {n} but {len(betas)} betas rows")
        # trial.npy's layout in the hosted tars is unverified: without one index per repetition the
        # trials are unknown (-1), and only --repeats mean can be written
        trials = trial[:n].astype(np.int64) if trial.size >= n else np.full(n, -1, np.int64)
        out.append((image, trials, betas[:n].astype(np.float32)))
    return out


def prepare_mindeye1(
    root: Path | str,
    subject: int,
    out: Path | str,
    *,
    zscore: str = "session",
    repeats: str = "mean",
    rois_from: Path | str | None = None,
) -> Path:
    """The fMRI store of one subject from MindEye1's release (see the module docstring)."""
    check_choice("--zscore", zscore, ("session",), "MindEye1's betas are z-scored per session upstream")
    root = require(Path(root), "MindEye1 webdataset_avg_split folder")
    found = {folder: tars(root, subject, folder) for folder in SPLITS}
    for folder in ("train", "test"):
        if not found[folder]:
            raise UserError(f"no {folder}_subj{subject:02d}_*.tar in {root / folder}")
    ids, tests, trial_ids, rows = [], [], [], []
    for folder, is_test in SPLITS.items():
        for tar in found[folder]:
            for image, trial, betas in read_samples(tar):
                ids.append(np.full(len(trial), image))
                tests.append(np.full(len(trial), is_test))
                trial_ids.append(trial)
                rows.append(betas)
    widths = {r.shape[1] for r in rows}
    if len(widths) != 1:
        raise UserError(f"{root}: samples of subject {subject} disagree on the voxel count ({sorted(widths)})")
    betas = np.concatenate(rows)
    trial_ids = np.concatenate(trial_ids)
    known = trial_ids[trial_ids >= 0]
    if len(np.unique(known)) != len(known):
        raise UserError(f"{root}: a trial of subject {subject} appears in two samples")
    trials = Trials(np.concatenate(ids).astype(np.int64), np.concatenate(tests), trial_ids,
                    np.ones(len(trial_ids), np.int64))
    return write_store(
        out, subject=subject, trials=trials, read_rows=lambda r: betas[r], n_vox=betas.shape[1],
        zscore=zscore, repeats=repeats, sessions=[], trials_per_session=[], rois_from=rois_from,
        attrs={
            "source": "mindeye1",
            "zscore_upstream": True,
            "zscore_detail": "per session, per voxel, done upstream (MindEye1's webdataset_avg_split)",
            "sources": {"root": str(root), "tars": [str(t) for ts in found.values() for t in ts]},
        },
    )
