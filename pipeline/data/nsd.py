"""Read the Natural Scenes Dataset from its on-disk layout (see shared/reference/nsd.md).

Everything here reads; nothing writes. Paths, dtypes, index bases and axis orders follow the
real release so the same code runs on NSD and on the demo look-alike (:mod:`pipeline.demo.nsd`):

- ids in ``nsd_expdesign.mat`` and the stim-info rep columns are 1-based; this module returns
  0-based 73k image ids and 0-based global trial indices;
- NIfTI betas are (X, Y, Z, T) int16, HDF5 betas ``/betas`` are (T, Z, Y, X) int16; both are
  returned as (T, V) float32 percent signal change (int16 / 300) over the voxels of a mask taken
  in C order of the (X, Y, Z) volume.

:class:`NSD` implements the :class:`~pipeline.data.dataset.Dataset` protocol (registered as ``nsd``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io

from ..errors import UserError
from .dataset import DatasetBase, Trials, Voxels

BETA_SCALE = 300.0
"""NSD stores betas as int16 percent signal change times 300."""

ROI_NAMES: tuple[str, ...] = (
    "nsdgeneral",
    "prf-visualrois",
    "prf-eccrois",
    "floc-faces",
    "floc-bodies",
    "floc-places",
    "floc-words",
    "streams",
)
"""The volume ROI files prepare-fmri reads when present (labels per voxel, 0 = unlabelled)."""

DEFAULT_BETAS = "betas_fithrf_GLMdenoise_RR"
SPLIT_RECIPE = (
    "test = trials whose masterordering 10k index <= len(sharedix) (the shared images); train = the rest"
)


@dataclass(frozen=True)
class ExpDesign:
    """The parts of ``nsd_expdesign.mat`` decoding needs, as int64 arrays with the file's 1-based values."""

    masterordering: np.ndarray  # (n_trials_max,) 1-based 10k index per trial
    subjectim: np.ndarray  # (n_subjects, n_10k) 1-based 73k id of each subject's k-th image
    sharedix: np.ndarray  # (n_shared,) 1-based 73k ids of the shared images

    @property
    def n_shared(self) -> int:
        """10k indices 1..n_shared are the shared (test) images: 1000 in NSD."""
        return int(self.sharedix.size)

    def trials(self, subject: int, n_trials: int) -> tuple[np.ndarray, np.ndarray]:
        """0-based 73k image id and test flag of a subject's first ``n_trials`` trials (chronological)."""
        if not 1 <= subject <= self.subjectim.shape[0]:
            raise UserError(
                f"subject {subject} is not in nsd_expdesign.mat (subjects 1..{self.subjectim.shape[0]})"
            )
        if n_trials > self.masterordering.size:
            raise UserError(
                f"{n_trials} trials requested but nsd_expdesign.mat masterordering has only "
                f"{self.masterordering.size}"
            )
        k10 = self.masterordering[:n_trials]
        image_ids = self.subjectim[subject - 1, k10 - 1] - 1
        return image_ids.astype(np.int64), k10 <= self.n_shared


def read_ctab(path: Path) -> dict[int, str]:
    """Parse a FreeSurfer ``.ctab`` label table: one ``<int> <name>`` per line, names stripped."""
    labels: dict[int, str] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].lstrip("-").isdigit():
            labels[int(parts[0])] = parts[1].strip()
    return labels


def _check_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


@contextmanager
def open_hdf5(path: Path) -> Iterator[h5py.File]:
    """``path`` opened read-only; a file h5py cannot open is a :class:`UserError` naming it."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        yield f


class NSDLayout:
    """Where each NSD file lives below a root (paths only; the demo generator writes to them)."""

    def __init__(self, root: Path | str, betas: str = DEFAULT_BETAS) -> None:
        self.root = Path(root)
        self.betas_version = betas

    @property
    def expdesign_path(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_expdesign.mat"

    @property
    def stim_info_path(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv"

    @property
    def stimuli_path(self) -> Path:
        return self.root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"

    def annotations_path(self, kind: str, split: str) -> Path:
        """COCO annotation file, e.g. ``kind='captions'``, ``split='train2017'``."""
        return self.root / f"nsddata_stimuli/stimuli/nsd/annotations/{kind}_{split}.json"

    def roi_path(self, subject: int, name: str) -> Path:
        return self.root / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi/{name}.nii.gz"

    def ctab_path(self, subject: int, name: str) -> Path:
        return self.root / f"nsddata/freesurfer/subj{subject:02d}/label/{name}.mgz.ctab"

    def betas_dir(self, subject: int) -> Path:
        return self.root / f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/{self.betas_version}"

    def betas_path(self, subject: int, session: int, fmt: str) -> Path:
        suffix = {"nifti": "nii.gz", "hdf5": "hdf5"}[fmt]
        return self.betas_dir(subject) / f"betas_session{session:02d}.{suffix}"


class NSD(NSDLayout, DatasetBase):
    """Lazy reader over an NSD root folder (the real one or the demo look-alike).

    ``beta_format``: which beta files the protocol methods read (see :meth:`beta_format`).
    """

    name = "nsd"
    split_recipe = SPLIT_RECIPE

    def __init__(self, root: Path | str, betas: str = DEFAULT_BETAS, beta_format: str = "auto") -> None:
        super().__init__(root, betas)
        self.prefer_format = beta_format
        if not self.root.is_dir():
            raise UserError(f"NSD root not found: {self.root}")

    # ---- experiment design and image metadata ---------------------------------------------------
    @cached_property
    def expdesign(self) -> ExpDesign:
        path = _check_file(self.expdesign_path, "experiment design file")
        try:
            mat = scipy.io.loadmat(path)
        except Exception as exc:
            raise UserError(f"{path}: not a readable MATLAB file ({exc})") from None
        missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
        if missing:
            raise UserError(f"{path}: missing variables {missing}")
        return ExpDesign(
            masterordering=np.asarray(mat["masterordering"]).ravel().astype(np.int64),
            subjectim=np.atleast_2d(np.asarray(mat["subjectim"])).astype(np.int64),
            sharedix=np.asarray(mat["sharedix"]).ravel().astype(np.int64),
        )

    @cached_property
    def stim_info(self) -> pd.DataFrame:
        """``nsd_stim_info_merged.csv``: one row per 73k image, indexed by 0-based id."""
        path = _check_file(self.stim_info_path, "stimulus info file")
        return pd.read_csv(path, index_col=0)

    @contextmanager
    def stimuli(self) -> Iterator[h5py.Dataset]:
        """The ``imgBrick`` dataset (N, H, W, 3) uint8, opened lazily: index it in batches."""
        path = _check_file(self.stimuli_path, "stimulus file")
        with open_hdf5(path) as f:
            if "imgBrick" not in f:
                raise UserError(f"{path}: no 'imgBrick' dataset (found {sorted(f.keys())})")
            yield f["imgBrick"]

    def categories(self, image_ids: Sequence[int]) -> tuple[list[str], np.ndarray]:
        """Category names (K,) and a multi-hot (n, K) bool matrix for 0-based 73k ``image_ids``.

        Reads each image's COCO categories from ``instances_<cocoSplit>.json`` (through its
        ``cocoId``); the columns are the union of the files' categories, by category id.
        """
        info = self.stim_info
        ids = np.asarray(image_ids, dtype=np.int64)
        unknown = np.setdiff1d(ids, info.index.to_numpy())
        if unknown.size:
            raise UserError(f"image ids {unknown[:5].tolist()} are not in {self.stim_info_path}")
        rows = info.loc[ids, ["cocoId", "cocoSplit"]]
        names: dict[int, str] = {}
        labels: dict[tuple[str, int], set[int]] = {}
        for split in sorted(rows["cocoSplit"].unique()):
            path = self.annotations_path("instances", split)
            if not path.is_file():
                raise UserError(f"COCO instances file not found: {path}")
            try:
                doc = json.loads(path.read_text())
                names.update({int(c["id"]): str(c["name"]) for c in doc["categories"]})
                for ann in doc["annotations"]:
                    labels.setdefault((split, int(ann["image_id"])), set()).add(int(ann["category_id"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{path}: not a COCO instances file ({type(exc).__name__}: {exc})") from None
        if not names:
            raise UserError(f"no categories in the COCO instances files under {self.annotations_path('instances', '*').parent}")
        cat_ids = sorted(names)
        column = {c: j for j, c in enumerate(cat_ids)}
        hot = np.zeros((len(rows), len(cat_ids)), bool)
        for row, (coco_id, split) in enumerate(rows.itertuples(index=False)):
            for c in labels.get((split, int(coco_id)), ()):
                hot[row, column[c]] = True
        return [names[c] for c in cat_ids], hot

    def captions(self, image_ids: Sequence[int], per_image: int = 5) -> np.ndarray:
        """Captions of 0-based 73k ids as an (n, per_image) str array, '' where an image has fewer.

        Looks captions up in COCO ``captions_<cocoSplit>.json`` by each image's ``cocoId``.
        """
        info = self.stim_info.loc[list(image_ids), ["cocoId", "cocoSplit"]]
        by_split: dict[str, dict[int, list[str]]] = {}
        for split in info["cocoSplit"].unique():
            path = _check_file(self.annotations_path("captions", split), "COCO captions file")
            table: dict[int, list[str]] = {}
            for ann in json.loads(path.read_text())["annotations"]:
                table.setdefault(int(ann["image_id"]), []).append(ann["caption"].strip())
            by_split[split] = table
        out = np.full((len(info), per_image), "", dtype=object)
        for row, (coco_id, split) in enumerate(info.itertuples(index=False)):
            caps = by_split[split].get(int(coco_id), [])[:per_image]
            out[row, : len(caps)] = caps
        return out.astype(str)

    # ---- ROIs ----------------------------------------------------------------------------------
    def read_roi(self, subject: int, name: str) -> np.ndarray:
        """ROI volume (X, Y, Z) as int32 labels; -1 outside cortex, 0 unlabelled, 1..N labels."""
        path = _check_file(self.roi_path(subject, name), f"ROI file '{name}' of subject {subject}")
        try:
            data = np.asanyarray(nib.load(path).dataobj)
        except Exception as exc:
            raise UserError(f"{path}: not a readable NIfTI file ({exc})") from None
        return np.rint(data).astype(np.int32)

    def roi_labels(self, subject: int, name: str) -> dict[int, str]:
        """Label names from the ROI's ``.ctab`` table, or {} when the table is absent."""
        path = self.ctab_path(subject, name)
        return read_ctab(path) if path.is_file() else {}

    def available_rois(self, subject: int) -> list[str]:
        return [n for n in ROI_NAMES if self.roi_path(subject, n).is_file()]

    def voxels(self, subject: int) -> Voxels:
        """The nsdgeneral voxels (C order) with every present ROI file's labels, checked to share one volume."""
        general = self.read_roi(subject, "nsdgeneral")
        mask = general == 1
        if not mask.any():
            raise UserError(f"{self.roi_path(subject, 'nsdgeneral')}: no voxel has label 1")
        rois, names = {}, {}
        for name in self.available_rois(subject):
            vol = general if name == "nsdgeneral" else self.read_roi(subject, name)
            if vol.shape != mask.shape:
                raise UserError(
                    f"{self.roi_path(subject, name)}: volume is {vol.shape} but nsdgeneral is {mask.shape}"
                )
            rois[name] = np.maximum(vol[mask], 0)  # -1 (outside cortex) -> 0 (unlabelled)
            names[name] = self.roi_labels(subject, name)
        return Voxels(ijk=np.argwhere(mask).astype(np.int32), rois=rois, roi_labels=names, mask=mask)

    # ---- betas ---------------------------------------------------------------------------------
    def sessions(self, subject: int) -> list[int]:
        """Sessions with a beta file (either format); they must run 1..S without gaps."""
        folder = self.betas_dir(subject)
        if not folder.is_dir():
            raise UserError(f"no betas for subject {subject}: {folder} not found")
        found = sorted(
            {int(p.name[len("betas_session"):][:2]) for p in folder.glob("betas_session[0-9][0-9].*")
             if p.name.endswith((".nii.gz", ".hdf5"))}
        )
        if not found:
            raise UserError(f"no betas_sessionNN.nii.gz or .hdf5 files in {folder}")
        gaps = sorted(set(range(1, found[-1] + 1)) - set(found))
        if gaps:
            raise UserError(f"{folder}: sessions {gaps} are missing (found {found})")
        return found

    def trials(self, subject: int, sessions: Sequence[int]) -> Trials:
        """The trials of ``sessions`` (counted from their beta files' headers) in chronological order."""
        bounds, start = [], 0
        for s in sessions:
            n = self.n_trials(subject, s, self.prefer_format)
            bounds.append((start, start + n))
            start += n
        image_ids, is_test = self.expdesign.trials(subject, start)
        return Trials(image_ids, is_test, bounds)

    def read_session(self, subject: int, session: int, voxels: Voxels) -> np.ndarray:
        return self.read_betas(subject, session, voxels.mask, self.prefer_format)

    def store_attrs(self, subject: int, sessions: Sequence[int], voxels: Voxels) -> dict:
        """What an fMRI store records about where its rows came from (prepare-fmri)."""
        rois = list(voxels.rois)
        return {
            "n_shared": self.expdesign.n_shared,
            "volume_shape": list(voxels.mask.shape),
            "voxel_order": "C order over the (X, Y, Z) volume where nsdgeneral == 1",
            "rois": rois,
            "betas_version": self.betas_version,
            "sources": {
                "nsd_root": str(self.root),  # as given: an absolute path would differ between clones
                "expdesign": str(self.expdesign_path),
                "betas": [str(self.betas_path(subject, s, self.beta_format(subject, s, self.prefer_format)))
                          for s in sessions],
                "rois": [str(self.roi_path(subject, r)) for r in rois],
            },
        }

    def beta_format(self, subject: int, session: int, prefer: str = "auto") -> str:
        """Which file to read for a session: ``hdf5`` (preferred by ``auto``: uncompressed) or ``nifti``."""
        order = {"auto": ("hdf5", "nifti"), "hdf5": ("hdf5",), "nifti": ("nifti",)}.get(prefer)
        if order is None:
            raise UserError(f"beta format must be auto, hdf5 or nifti, not {prefer!r}")
        for fmt in order:
            if self.betas_path(subject, session, fmt).is_file():
                return fmt
        wanted = " or ".join(str(self.betas_path(subject, session, f)) for f in order)
        raise UserError(f"beta file not found: {wanted}")

    def read_betas(self, subject: int, session: int, mask: np.ndarray, fmt: str = "auto") -> np.ndarray:
        """(T, V) float32 percent signal change of one session over the voxels where ``mask``.

        ``mask`` is a boolean (X, Y, Z) volume; voxels come in its C order, whichever file is read.
        """
        fmt = self.beta_format(subject, session, fmt)
        path = self.betas_path(subject, session, fmt)
        raw = _read_nifti_betas(path, mask) if fmt == "nifti" else _read_hdf5_betas(path, mask)
        return raw.astype(np.float32) / np.float32(BETA_SCALE)

    def n_trials(self, subject: int, session: int, fmt: str = "auto") -> int:
        """Trials in a session, read from the beta file's header (750 in NSD)."""
        fmt = self.beta_format(subject, session, fmt)
        path = self.betas_path(subject, session, fmt)
        if fmt == "nifti":
            return int(_load_nifti(path).shape[-1])
        with open_hdf5(path) as f:
            return int(_hdf5_betas(f, path).shape[0])


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
    except Exception as exc:
        raise UserError(f"{path}: not a readable NIfTI file ({exc})") from None
    if len(img.shape) != 4:
        raise UserError(f"{path}: expected a 4-D (X, Y, Z, trials) volume, got shape {img.shape}")
    return img


def _read_nifti_betas(path: Path, mask: np.ndarray) -> np.ndarray:
    img = _load_nifti(path)
    if tuple(img.shape[:3]) != mask.shape:
        raise UserError(
            f"{path}: beta volume is {tuple(img.shape[:3])} but the ROI volume is {mask.shape}"
        )
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise UserError(f"{path}: corrupt NIfTI data ({exc})") from None
    return data[mask].T  # (V, T) -> (T, V)


def _hdf5_betas(f: h5py.File, path: Path) -> h5py.Dataset:
    if "betas" not in f:
        raise UserError(f"{path}: no '/betas' dataset (found {sorted(f.keys())})")
    ds = f["betas"]
    if ds.ndim != 4:
        raise UserError(f"{path}: expected /betas of shape (trials, Z, Y, X), got {ds.shape}")
    return ds


def _read_hdf5_betas(path: Path, mask: np.ndarray) -> np.ndarray:
    with open_hdf5(path) as f:
        ds = _hdf5_betas(f, path)
        if tuple(ds.shape[1:]) != mask.shape[::-1]:
            raise UserError(
                f"{path}: /betas volume is (Z, Y, X) = {tuple(ds.shape[1:])} but the ROI volume "
                f"(X, Y, Z) = {mask.shape} needs {mask.shape[::-1]}"
            )
        try:
            data = ds[()]
        except Exception as exc:
            raise UserError(f"{path}: corrupt HDF5 data ({exc})") from None
    # voxel (i, j, k) of the (X, Y, Z) mask sits at flat index ravel((k, j, i)) of (Z, Y, X)
    i, j, k = np.nonzero(mask)
    flat = np.ravel_multi_index((k, j, i), mask.shape[::-1])
    return data.reshape(data.shape[0], -1)[:, flat]
