"""Brain-Diffuser's arrays (``ozcelikfu/brain-diffuser`` ``data/prepare_nsddata.py``) -> the fMRI store.

Root = Brain-Diffuser's ``data/`` folder: ``processed_data/subjXX/nsd_{train,test}_fmriavg_nsdgeneral_subN.npy``
(images x nsdgeneral voxels: NSD's betas x 300, repeats averaged, not z-scored) and
``nsddata/experiments/nsd/nsd_expdesign.mat``. The arrays carry no ids: its recipe walks the trials
in order, ``nsdId = subjectim[s-1, masterordering[t]-1] - 1``, shared (``masterordering <= 1000``,
here ``<= len(sharedix)``) to test, the rest to train, each image at its first appearance. The number
of sessions it used (37 for its subjects) is the one whose image counts match the arrays. Betas
become percent signal change (/ 300), as ``--zscore none`` gives for raw NSD.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from ...errors import UserError
from ..nsd import BETA_SCALE, NSD
from .common import Trials, check_choice, require, write_store


def array_path(root: Path, subject: int, split: str, kind: str) -> Path:
    """``kind``: ``fmriavg_nsdgeneral``, ``stim`` or ``cap``."""
    return root / f"processed_data/subj{subject:02d}/nsd_{split}_{kind}_sub{subject}.npy"


def trials_per_session(root: Path) -> int:
    """Trials per session from the design: ``masterordering`` length / sessions in ``stimpattern``
    (30000 / 40 = 750 in NSD)."""
    path = NSD(root).expdesign_path
    mat = scipy.io.loadmat(require(path, "NSD experiment design file"), variable_names=["stimpattern"])
    if "stimpattern" not in mat:
        raise UserError(f"{path}: no 'stimpattern' (needed for the trials per session)")
    return NSD(root).expdesign.masterordering.size // mat["stimpattern"].shape[0]


def recipe(root: Path, subject: int, n_train: int, n_test: int) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Sessions used and, per split, the arrays' 73k ids (first-appearance order) and repeat counts."""
    design = NSD(root).expdesign
    per_session = trials_per_session(root)
    for n_sessions in range(1, design.masterordering.size // per_session + 1):
        ids, shared = design.trials(subject, n_sessions * per_session)
        found = {}
        for split, sel in (("train", ~shared), ("test", shared)):
            uniq, index, counts = np.unique(ids[sel], return_index=True, return_counts=True)
            order = np.argsort(index)
            found[split] = (uniq[order], counts[order])
        if (len(found["train"][0]), len(found["test"][0])) == (n_train, n_test):
            return n_sessions, found
    raise UserError(
        f"{array_path(root, subject, 'train', 'fmriavg_nsdgeneral')}: {n_train} train and {n_test} test images "
        f"match no number of whole sessions of subject {subject} in nsd_expdesign.mat"
    )


def prepare_brain_diffuser(
    root: Path | str,
    subject: int,
    out: Path | str,
    *,
    zscore: str = "none",
    repeats: str = "mean",
    rois_from: Path | str | None = None,
) -> Path:
    """The fMRI store of one subject from Brain-Diffuser's arrays (see the module docstring)."""
    check_choice("--zscore", zscore, ("none",), "Brain-Diffuser's arrays are per-image averages in percent "
                 "signal change x 300")
    root = Path(root)
    arrays = {}
    for split in ("train", "test"):
        path = require(array_path(root, subject, split, "fmriavg_nsdgeneral"), f"Brain-Diffuser {split} betas")
        try:
            arrays[split] = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise UserError(f"{path}: not a readable .npy array ({exc})") from None
        if arrays[split].ndim != 2:
            raise UserError(f"{path}: expected (images, voxels), got {arrays[split].shape}")
    if arrays["train"].shape[1] != arrays["test"].shape[1]:
        raise UserError(f"{root}: train and test arrays of subject {subject} differ in voxel count")
    n_sessions, found = recipe(root, subject, len(arrays["train"]), len(arrays["test"]))
    ids = np.concatenate([found["train"][0], found["test"][0]]).astype(np.int64)
    n_train = len(found["train"][0])
    trials = Trials(ids, np.arange(len(ids)) >= n_train, np.full(len(ids), -1, np.int64),
                    np.concatenate([found["train"][1], found["test"][1]]).astype(np.int64))

    def read_rows(rows: np.ndarray) -> np.ndarray:
        out_rows = np.empty((len(rows), arrays["train"].shape[1]), np.float32)
        for k, r in enumerate(rows):
            out_rows[k] = arrays["train"][r] if r < n_train else arrays["test"][r - n_train]
        return out_rows / np.float32(BETA_SCALE)

    per_session = trials_per_session(root)
    return write_store(
        out, subject=subject, trials=trials, read_rows=read_rows, n_vox=arrays["train"].shape[1], zscore=zscore,
        repeats=repeats, sessions=list(range(1, n_sessions + 1)), trials_per_session=[per_session] * n_sessions,
        rois_from=rois_from,
        attrs={
            "source": "brain-diffuser",
            "zscore_upstream": False,
            "zscore_detail": "none (percent signal change: Brain-Diffuser's betas / 300)",
            "sources": {"root": str(root), "betas": [str(array_path(root, subject, s, "fmriavg_nsdgeneral"))
                                                     for s in ("train", "test")],
                        "expdesign": str(NSD(root).expdesign_path)},
        },
    )
