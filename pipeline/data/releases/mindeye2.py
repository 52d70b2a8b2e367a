"""MindEye2's Hugging Face release (``pscotti/mindeyev2``) -> the fMRI store.

Root = the folder holding ``betas_all_subj0X_fp32_renorm.hdf5`` (``betas``: trials x nsdgeneral voxels,
float32, already z-scored per voxel with training-set statistics) and ``wds/subj0X/{train/*, test/0,
new_test/0}.tar``, whose samples' ``behav.npy`` has 17 columns (-1 = NaN): 0 = 0-based 73k id,
2 = session (1-based), 5 = global trial = row of the betas file, 16 = IS_SHARED1000. The betas are
kept as published; the store records ``zscore: train`` and ``zscore_upstream: true``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UserError
from ..nsd import open_hdf5
from .common import Trials, check_choice, load_npy, require, tar_samples, write_store

BEHAV_COLUMNS = 17
COL_ID, COL_SESSION, COL_TRIAL, COL_SHARED = 0, 2, 5, 16
TEST_SETS = {"new": "new_test", "old": "test"}
"""``--test-set``: ``new`` = shared trials of all sessions (MindEye2's default), ``old`` = the older
set from the first 37 (subjects 1/2/5/7) sessions."""


def betas_path(root: Path, subject: int) -> Path:
    return root / f"betas_all_subj{subject:02d}_fp32_renorm.hdf5"


def wds_dir(root: Path, subject: int) -> Path:
    return root / f"wds/subj{subject:02d}"


def read_behav(tar: Path) -> np.ndarray:
    """(n, 17) int64 ``behav`` rows of every sample of one tar."""
    rows = []
    for key, sample in tar_samples(tar):
        if "behav.npy" not in sample:
            raise UserError(f"{tar}: sample {key!r} has no behav.npy (found {sorted(sample)})")
        behav = load_npy(sample["behav.npy"], f"{tar}:{key}.behav.npy").reshape(-1)
        if behav.size != BEHAV_COLUMNS:
            raise UserError(f"{tar}: sample {key!r} behav.npy has {behav.size} values, expected {BEHAV_COLUMNS}")
        rows.append(behav)
    if not rows:
        raise UserError(f"{tar}: no samples")
    return np.rint(np.stack(rows)).astype(np.int64)


def trial_table(root: Path, subject: int, test_set: str) -> tuple[np.ndarray, np.ndarray]:
    """All ``behav`` rows of the training tars and the chosen test tar, and their test flags."""
    check_choice("--test-set", test_set, tuple(TEST_SETS), "MindEye2 has new_test and test")
    wds = require(wds_dir(root, subject), f"MindEye2 webdatasets of subject {subject}")
    train_tars = sorted((wds / "train").glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    if not train_tars:
        raise UserError(f"no training tars in {wds / 'train'}")
    test_tar = require(wds / TEST_SETS[test_set] / "0.tar", f"MindEye2 {TEST_SETS[test_set]} tar")
    train = np.concatenate([read_behav(t) for t in train_tars])
    test = read_behav(test_tar)
    return np.concatenate([train, test]), np.r_[np.zeros(len(train), bool), np.ones(len(test), bool)]


def prepare_mindeye2(
    root: Path | str,
    subject: int,
    out: Path | str,
    *,
    zscore: str = "train",
    repeats: str = "mean",
    test_set: str = "new",
    sessions: int | None = None,
    rois_from: Path | str | None = None,
) -> Path:
    """The fMRI store of one subject from MindEye2's release (see the module docstring).

    ``sessions``: only trials of sessions 1..K (train and test, as prepare-fmri does). The betas
    stay as published, z-scored upstream with the statistics of every training session.
    """
    check_choice("--zscore", zscore, ("train",), "MindEye2's betas are z-scored upstream with training statistics")
    root = Path(root)
    path = require(betas_path(root, subject), f"MindEye2 betas of subject {subject}")
    behav, is_test = trial_table(root, subject, test_set)
    session = behav[:, COL_SESSION]
    if sessions is not None:
        present = np.unique(session)
        if not 1 <= sessions <= len(present):
            raise UserError(f"--sessions {sessions}: subject {subject} has sessions 1..{len(present)} in {root}")
        keep = session <= present[sessions - 1]
        behav, is_test, session = behav[keep], is_test[keep], session[keep]
    global_trial = behav[:, COL_TRIAL]
    if np.any(behav[:, COL_ID] < 0) or np.any(global_trial < 0):
        raise UserError(f"{wds_dir(root, subject)}: behav rows with a missing (-1) image id or trial")
    with open_hdf5(path) as f:
        if "betas" not in f or f["betas"].ndim != 2:
            raise UserError(f"{path}: expected a 2-D 'betas' dataset (trials, voxels)")
        n_rows, n_vox = f["betas"].shape
    if global_trial.max() >= n_rows:
        raise UserError(
            f"{path}: behav global trial {int(global_trial.max())} is past the betas file's {n_rows} rows"
        )
    trials = Trials(behav[:, COL_ID], is_test, global_trial, np.ones(len(behav), np.int64))

    def read_rows(rows: np.ndarray) -> np.ndarray:
        wanted = global_trial[rows]
        unique, inverse = np.unique(wanted, return_inverse=True)  # h5py reads increasing indices
        with open_hdf5(path) as f:
            return f["betas"][unique, :][inverse].astype(np.float32)

    used = sorted(int(s) for s in np.unique(session))
    return write_store(
        out, subject=subject, trials=trials, read_rows=read_rows, n_vox=int(n_vox), zscore=zscore,
        repeats=repeats, sessions=used, trials_per_session=[int((session == s).sum()) for s in used],
        rois_from=rois_from,
        attrs={
            "source": "mindeye2",
            "zscore_upstream": True,
            "zscore_detail": "per voxel with the training trials' statistics, done upstream (MindEye2's "
            "published betas_all_subjXX_fp32_renorm.hdf5, kept as published)",
            "test_set": test_set,
            "sources": {"root": str(root), "betas": str(path), "wds": str(wds_dir(root, subject))},
        },
    )
