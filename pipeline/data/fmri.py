"""prepare-fmri: one subject's betas -> ``cache/fmri/subjNN.zarr`` (train/test, per-voxel ROI labels).

Reads through the :class:`~pipeline.data.dataset.Dataset` protocol (``dataset``, NSD by default).
Sessions are streamed one at a time, so memory stays at one session plus the per-image sums.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from .. import __version__
from ..errors import UserError
from ..store import atomic_store, compressor
from .dataset import Dataset
from .registry import DEFAULT, open_dataset

ZSCORE_MODES = ("session", "train", "none")
"""``--zscore`` modes: per session over all its trials (MindEye1), per voxel with the statistics of the
training trials used (MindEye2's published betas), or none (percent signal change)."""
ZSCORE_DETAIL = {
    "session": "per session, per voxel, over all trials of the session, population std",
    "train": "per voxel, with the mean and population std of the training trials used (after --sessions / "
    "--train-sessions), applied to train and test",
    "none": "none (percent signal change)",
}
REPEATS = {
    "mean": "train and test: one row per image, the mean of its trials, sorted by image id",
    "trials": "train and test: one row per trial, in chronological order",
    "train-trials": "train: one row per trial, in chronological order; test: one row per image, the mean "
    "of its trials, sorted by image id",
}
"""``--repeats`` modes. ``train-trials`` is the MindEye / Lite-Mind regime: train on single trials,
test on image averages."""


def zscore_session(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score each voxel over all trials of one session (population std, ddof=0).

    Returns the z-scored (T, V) float32 array and the (V,) mask of invalid voxels, those exactly 0
    in every trial (outside the session's field of view). Voxels with zero variance are set to 0,
    so the result is always finite.
    """
    invalid = ~np.any(betas != 0, axis=0)
    mean = betas.mean(axis=0, dtype=np.float64)
    std = betas.std(axis=0, dtype=np.float64)
    ok = std > 0
    z = np.zeros_like(betas, dtype=np.float32)
    z[:, ok] = ((betas[:, ok] - mean[ok]) / std[ok]).astype(np.float32)
    return z, invalid


def _select_sessions(data: Dataset, subject: int, sessions: int | None) -> list[int]:
    present = data.sessions(subject)
    if sessions is None:
        return present
    if not 1 <= sessions <= len(present):
        raise UserError(f"--sessions {sessions}: subject {subject} has sessions 1..{len(present)} in {data.name} "
                        f"{data.root}")
    return present[:sessions]


def prepare_fmri(
    nsd_root: Path | str,
    subject: int,
    out: Path | str,
    *,
    sessions: int | None = None,
    zscore: str = "session",
    repeats: str = "mean",
    beta_format: str = "auto",
    betas_version: str | None = None,
    train_sessions: int | None = None,
    progress: bool = True,
    dataset: str = DEFAULT,
) -> Path:
    """Build the fMRI cache of one subject; see shared/DESIGN.md "The fMRI cache" for the layout.

    ``nsd_root``: the root of ``dataset`` (a registered name, :mod:`.registry`); ``beta_format``
    and ``betas_version`` are NSD's options.

    ``repeats``: one of :data:`REPEATS` (how the 1-3 trials of an image become rows, per split).
    ``train_sessions``: training rows come from the first K of the sessions used only, test rows
    from all of them (MindEye2's 1-hour protocol: one session to train on, the full test set to
    score on).
    """
    if zscore not in ZSCORE_MODES:
        raise UserError(f"--zscore must be one of {ZSCORE_MODES}, not {zscore!r}")
    if repeats not in REPEATS:
        raise UserError(f"--repeats must be one of {', '.join(REPEATS)}, not {repeats!r}")
    options = {"betas": betas_version} if betas_version else {}  # NSD's options, passed only when set
    if beta_format != "auto":
        options["beta_format"] = beta_format
    data = open_dataset(dataset, nsd_root, **options)
    data.trials(subject, [])  # validates the subject number early
    used = _select_sessions(data, subject, sessions)
    voxels = data.voxels(subject)
    trials = data.trials(subject, used)
    n_vox = voxels.n

    splits = {"train": ~trials.is_test, "test": trials.is_test}
    if train_sessions is not None:
        if not isinstance(train_sessions, int) or not 1 <= train_sessions <= len(used):
            raise UserError(f"--train-sessions {train_sessions}: choose 1..{len(used)} (the sessions used)")
        splits["train"] = splits["train"] & (np.arange(len(trials.is_test)) < trials.session_bounds[train_sessions - 1][1])
    averaged = {"train": repeats == "mean", "test": repeats in ("mean", "train-trials")}
    rows = {  # per split: the sorted image ids (averaged) or the global trial ids (per trial)
        k: np.unique(trials.image_ids[sel]) if averaged[k] else np.flatnonzero(sel) for k, sel in splits.items()
    }
    sums = {k: np.zeros((len(r), n_vox), np.float64) for k, r in rows.items() if averaged[k]}
    counts = {k: np.zeros(len(r), np.int64) for k, r in rows.items() if averaged[k]}
    invalid_sessions = np.zeros(n_vox, np.int32)
    train_moments = np.zeros((3, n_vox), np.float64)  # count, sum, sum of squares of the training trials

    out = Path(out)
    with atomic_store(out) as root:
        betas_out = {k: row_array(root, f"{k}/betas", (len(r), n_vox), np.float32) for k, r in rows.items()
                     if not averaged[k]}
        row_of_trial = {k: {t: i for i, t in enumerate(rows[k])} for k in betas_out}

        for session, (start, stop) in tqdm(
            list(zip(used, trials.session_bounds)), desc=f"subj{subject:02d} sessions",
            unit="session", disable=not progress,
        ):
            betas = data.read_session(subject, session, voxels)
            if betas.shape[0] != stop - start:
                raise UserError(f"{data.name} subject {subject} session {session}: {betas.shape[0]} trials in its "
                                f"betas, {stop - start} in its trial table")
            if zscore == "session":
                betas, invalid = zscore_session(betas)
            else:
                invalid = ~np.any(betas != 0, axis=0)
                if zscore == "train":
                    used_train = betas[splits["train"][start:stop]].astype(np.float64)
                    train_moments[0] += len(used_train)
                    train_moments[1] += used_train.sum(0)
                    train_moments[2] += np.square(used_train).sum(0)
            invalid_sessions += invalid
            ids = trials.image_ids[start:stop]
            for split, sel in (("train", splits["train"][start:stop]), ("test", splits["test"][start:stop])):
                if averaged[split]:
                    pos = np.searchsorted(rows[split], ids[sel])
                    np.add.at(sums[split], pos, betas[sel])
                    np.add.at(counts[split], pos, 1)
                elif sel.any():
                    local = np.flatnonzero(sel) + start
                    first = row_of_trial[split][int(local[0])]
                    betas_out[split][first : first + len(local)] = betas[sel]

        standardise = train_standardiser(*train_moments) if zscore == "train" else None
        for split in ("train", "test"):
            if averaged[split]:
                mean = sums[split] / counts[split][:, None]
                mean = (standardise(mean) if standardise else mean).astype(np.float32)
                row_array(root, f"{split}/betas", mean.shape, np.float32)[...] = mean
                row_array(root, f"{split}/image_ids", (len(rows[split]),), np.int64)[...] = rows[split]
                row_array(root, f"{split}/n_repeats", counts[split].shape, np.int64)[...] = counts[split]
            else:
                row_array(root, f"{split}/image_ids", (len(rows[split]),), np.int64)[...] = (
                    trials.image_ids[rows[split]]
                )
                row_array(root, f"{split}/trial_ids", (len(rows[split]),), np.int64)[...] = rows[split]
                if standardise:
                    arr = betas_out[split]
                    for lo in range(0, arr.shape[0], arr.chunks[0]):
                        arr[lo : lo + arr.chunks[0]] = standardise(arr[lo : lo + arr.chunks[0]]).astype(np.float32)

        for name, lab in voxels.rois.items():
            arr = row_array(root, f"voxels/{name}", (n_vox,), np.int32)
            arr[...] = lab
            arr.attrs["labels"] = {str(k): v for k, v in voxels.roi_labels[name].items()}  # marks an ROI
        if voxels.ijk is not None:
            row_array(root, "voxels/ijk", (n_vox, 3), np.int32)[...] = voxels.ijk
        row_array(root, "voxels/invalid_sessions", (n_vox,), np.int32)[...] = invalid_sessions

        root.attrs.update(
            {
                "subject": subject,
                "sessions": used,
                "train_sessions": used[:train_sessions] if train_sessions else used,
                "trials_per_session": [b - a for a, b in trials.session_bounds],
                "zscore": zscore,
                "zscore_detail": ZSCORE_DETAIL[zscore],
                "repeats": repeats,
                "repeats_detail": REPEATS[repeats],
                "split": data.split_recipe,
                **data.store_attrs(subject, used, voxels),
                **({} if dataset == DEFAULT else {"dataset": dataset}),  # stores without one are NSD's
                "package_version": __version__,
            }
        )
    return out


def train_standardiser(n: np.ndarray, total: np.ndarray, squares: np.ndarray):
    """``x -> (x - mean) / std`` per voxel from training-trial moments (population std); voxels with
    zero variance (or no training trial) map to 0, so the result is always finite."""
    count = np.maximum(n, 1)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    ok = std > 0
    scale = np.where(ok, 1.0 / np.where(ok, std, 1.0), 0.0)

    def standardise(x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - mean) * scale

    return standardise


def beta_chunk_rows(shape: tuple[int, ...], dtype: type) -> int:
    """Rows per chunk of a :func:`row_array` of ``shape``: about 16 MB per chunk, at least one row."""
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize or 1
    return max(1, min(shape[0] if shape[0] else 1, (16 << 20) // row_bytes))


def row_array(root: zarr.Group, path: str, shape: tuple[int, ...], dtype: type) -> zarr.Array:
    """An array at ``group/name`` chunked by rows (:func:`beta_chunk_rows`) and compressed."""
    group_name, _, name = path.rpartition("/")
    group = root.require_group(group_name) if group_name else root
    chunks = (beta_chunk_rows(shape, dtype), *shape[1:])
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=[compressor()])
