"""What the release readers share: their trial tables, webdataset tars, ROI labels from raw NSD,
and the one function that writes the fMRI store (the layout of :func:`pipeline.data.fmri.prepare_fmri`).

A reader turns its release into a :class:`Trials` table (one row per trial, or per image where the
release only holds averages) plus a function reading those rows' betas; :func:`write_store` arranges
them by ``--repeats`` exactly as prepare-fmri does, so the same subject gives the same store from raw
NSD and from each release.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import UserError
from ...store import atomic_store
from ..dataset import Voxels
from ..nsd import NSD, SPLIT_RECIPE

ReadRows = Callable[[np.ndarray], np.ndarray]
"""Betas (n, V) float32 of the given row indices of a :class:`Trials` table."""


@dataclass(frozen=True)
class Trials:
    """A subject's rows in chronological order. ``trial_ids``: 0-based global NSD trial (-1 where the
    release has only per-image averages); ``n_repeats``: trials behind each row (1 per trial)."""

    image_ids: np.ndarray  # (n,) int64, 0-based 73k ids
    is_test: np.ndarray  # (n,) bool
    trial_ids: np.ndarray  # (n,) int64
    n_repeats: np.ndarray  # (n,) int64

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if not all(len(a) == n for a in (self.is_test, self.trial_ids, self.n_repeats)):
            raise ValueError("Trials columns must have one entry per row")

    @property
    def per_trial(self) -> bool:
        return bool(np.all(self.n_repeats == 1) and np.all(self.trial_ids >= 0))


def check_choice(option: str, value: str, allowed: tuple[str, ...], why: str) -> None:
    """One-line error for a ``--zscore`` / ``--repeats`` value the release cannot give."""
    if value not in allowed:
        raise UserError(f"{option} {value}: this release supports {' or '.join(allowed)} only ({why})")


def tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a webdataset tar as ``(key, {extension: bytes})``, in file order.

    Read with the standard library's ``tarfile`` rather than the ``webdataset`` package: the readers
    need only this grouping of members by key (webdataset's own rule: the basename up to its first
    dot), not webdataset's decoding, shuffling or URL handling, and it saves a dependency.
    """
    try:
        tar = tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as exc:
        raise UserError(f"{path}: not a readable tar file ({exc})") from None
    key, sample = None, {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            this = f"{folder}/{stem}" if folder else stem
            if this != key and sample:
                yield key, sample
                sample = {}
            key = this
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def load_npy(data: bytes, where: str) -> np.ndarray:
    """A ``.npy`` member of a tar sample; a damaged one is a one-line error naming it."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{where}: not a readable .npy array ({exc})") from None


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else a one-line error saying what is missing."""
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    return path


def roi_labels(rois_from: Path | str, subject: int, n_vox: int) -> tuple[Voxels, NSD]:
    """Raw NSD's voxels (nsdgeneral mask, per-voxel ROI labels, ijk) and its reader, checked to
    describe the release's ``n_vox`` columns (nsdgeneral voxels in C order)."""
    nsd = NSD(rois_from)
    voxels = nsd.voxels(subject)
    mask = voxels.mask
    if int(mask.sum()) != n_vox:
        raise UserError(
            f"{nsd.roi_path(subject, 'nsdgeneral')}: {int(mask.sum())} nsdgeneral voxels but the release's "
            f"betas have {n_vox} columns (another subject, or another ROI version?)"
        )
    return voxels, nsd


def _arrange(trials: Trials, sel: np.ndarray, averaged: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """Row ids and, per output row, the table rows it averages: sorted image ids (averaged) or
    the selected rows in chronological order (per trial)."""
    rows = np.flatnonzero(sel)
    if not averaged:
        rows = rows[np.argsort(trials.trial_ids[rows], kind="stable")]
        return rows, [np.array([r]) for r in rows]
    ids, inverse = np.unique(trials.image_ids[rows], return_inverse=True)
    return ids, [rows[inverse == k] for k in range(len(ids))]


def write_store(
    out: Path | str,
    *,
    subject: int,
    trials: Trials,
    read_rows: ReadRows,
    n_vox: int,
    zscore: str,
    repeats: str,
    sessions: list[int],
    trials_per_session: list[int],
    attrs: dict,
    rois_from: Path | str | None = None,
) -> Path:
    """Write the fMRI store of :func:`pipeline.data.fmri.prepare_fmri` from a release's rows.

    Everything is checked before the store is opened, which is written atomically: a failure leaves
    no store behind. Without ``rois_from`` the store has no ``voxels/`` labels or ``ijk`` (the release
    has none); ``voxels/invalid_sessions`` is never written (the releases do not reveal it).
    ``attrs["source"]`` names the release, recorded as the store's ``dataset`` too.
    """
    from ..fmri import REPEATS, ZSCORE_MODES, row_array  # here: fmri imports the registry, which imports the releases

    if zscore not in ZSCORE_MODES:
        raise UserError(f"--zscore must be one of {ZSCORE_MODES}, not {zscore!r}")
    if repeats not in REPEATS:
        raise UserError(f"--repeats must be one of {', '.join(REPEATS)}, not {repeats!r}")
    if repeats != "mean" and not trials.per_trial:
        raise UserError(f"--repeats {repeats}: this release has no per-trial rows with trial indices; use --repeats mean")
    averaged = {"train": repeats == "mean", "test": repeats in ("mean", "train-trials")}
    splits = {"train": ~trials.is_test, "test": trials.is_test}
    for split, sel in splits.items():
        if not sel.any():
            raise UserError(f"the release has no {split} trials for subject {subject} in the sessions used")
    voxels = roi_labels(rois_from, subject, n_vox) if rois_from is not None else None

    out = Path(out)
    with atomic_store(out) as root:
        for split, sel in splits.items():
            ids, groups = _arrange(trials, sel, averaged[split])
            betas = row_array(root, f"{split}/betas", (len(ids), n_vox), np.float32)
            step = betas.chunks[0]
            for lo in range(0, len(groups), step):
                block = groups[lo : lo + step]
                flat = np.concatenate(block)
                values = read_rows(flat).astype(np.float64)
                weights = trials.n_repeats[flat].astype(np.float64)
                owner = np.repeat(np.arange(len(block)), [len(g) for g in block])
                sums = np.zeros((len(block), n_vox))
                np.add.at(sums, owner, values * weights[:, None])
                betas[lo : lo + len(block)] = (sums / np.bincount(owner, weights)[:, None]).astype(np.float32)
            counts = np.array([int(trials.n_repeats[g].sum()) for g in groups], np.int64)
            if averaged[split]:
                row_array(root, f"{split}/image_ids", (len(ids),), np.int64)[...] = ids
                row_array(root, f"{split}/n_repeats", (len(ids),), np.int64)[...] = counts
            else:
                row_array(root, f"{split}/image_ids", (len(ids),), np.int64)[...] = trials.image_ids[ids]
                row_array(root, f"{split}/trial_ids", (len(ids),), np.int64)[...] = trials.trial_ids[ids]

        roi_attrs: dict = {"rois": []}
        if voxels is not None:
            found, nsd = voxels
            mask, rois = found.mask, list(found.rois)
            for name, lab in found.rois.items():
                arr = row_array(root, f"voxels/{name}", (n_vox,), np.int32)
                arr[...] = lab
                arr.attrs["labels"] = {str(k): v for k, v in found.roi_labels[name].items()}
            row_array(root, "voxels/ijk", (n_vox, 3), np.int32)[...] = found.ijk
            roi_attrs = {"rois": rois, "volume_shape": list(mask.shape),
                         "roi_sources": [str(nsd.roi_path(subject, r)) for r in rois]}
        root.attrs.update(
            {
                "subject": subject,
                "sessions": sessions,
                "train_sessions": sessions,
                "trials_per_session": trials_per_session,
                "zscore": zscore,
                "repeats": repeats,
                "repeats_detail": REPEATS[repeats],
                "split": SPLIT_RECIPE,
                "voxel_order": "C order over the (X, Y, Z) volume where nsdgeneral == 1",
                **roi_attrs,
                "dataset": attrs["source"],
                **attrs,
                "package_version": __version__,
            }
        )
    return out
