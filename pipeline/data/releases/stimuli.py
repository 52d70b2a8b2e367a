"""Stimuli of each release by 0-based 73k id, and the pixels the CLIP model sees.

- MindEye2: ``coco_images_224_float16.hdf5`` ``images`` (73000, 3, 224, 224) float16 in [0, 1];
- MindEye1: the 256-px ``jpg`` of each sample of the subject's tars;
- Brain-Diffuser: ``nsd_{train,test}_stim_subN.npy`` (n, 425, 425, 3), ids from its recipe.

What the CLIP model sees of them is :func:`pipeline.features.pixels.to_pixels`. Each release is
also a registered :class:`~pipeline.data.dataset.Dataset` (:class:`MindEye2`, :class:`MindEye1`,
:class:`BrainDiffuser`): its stimuli by 73k id for decode and evaluate, and Brain-Diffuser's captions.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from ...errors import UserError
from ..dataset import DatasetBase
from ..nsd import SPLIT_RECIPE, open_hdf5
from . import brain_diffuser, mindeye1
from .common import require, tar_samples

MINDEYE2_IMAGES = "coco_images_224_float16.hdf5"
NSD_IMAGES = 73_000
"""NSD's stimulus set, of which MindEye1's and Brain-Diffuser's files hold each subject's share."""


@dataclass
class ReleaseStimuli:
    """Images of one release: ``read(ids)`` gives (n, H, W, 3), uint8 or float32 in [0, 1]."""

    source: str
    path: Path
    ids: np.ndarray  # the 0-based 73k ids it holds
    _read: object

    def read(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        missing = np.setdiff1d(ids, self.ids)
        if missing.size:
            raise UserError(f"{self.path}: no image for 73k id {int(missing[0])} ({missing.size} missing)")
        return self._read(ids)


def _mindeye2(path: Path) -> ReleaseStimuli:
    file = require(path / MINDEYE2_IMAGES if path.is_dir() else path, "MindEye2 image file")
    with open_hdf5(file) as f:
        if "images" not in f or f["images"].ndim != 4 or f["images"].shape[1] != 3:
            raise UserError(f"{file}: expected an 'images' dataset (73000, 3, H, W)")
        n = f["images"].shape[0]

    def read(ids: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(ids, return_inverse=True)
        with open_hdf5(file) as f:
            chw = f["images"][unique][inverse]
        return np.ascontiguousarray(chw.transpose(0, 2, 3, 1), dtype=np.float32)

    return ReleaseStimuli("mindeye2", file, np.arange(n), read)


def _mindeye1(root: Path, subject: int) -> ReleaseStimuli:
    jpgs: dict[int, bytes] = {}
    for folder in mindeye1.SPLITS:
        for tar in mindeye1.tars(root, subject, folder):
            for key, sample in tar_samples(tar):
                if "jpg" not in sample or "coco73k.npy" not in sample:
                    raise UserError(f"{tar}: sample {key!r} lacks jpg or coco73k.npy")
                jpgs[int(np.load(io.BytesIO(sample["coco73k.npy"])).reshape(-1)[0])] = sample["jpg"]
    if not jpgs:
        raise UserError(f"no tars of subject {subject} in {root}")

    def read(ids: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(Image.open(io.BytesIO(jpgs[int(i)])).convert("RGB")) for i in ids])

    return ReleaseStimuli("mindeye1", root, np.array(sorted(jpgs)), read)


def _brain_diffuser_rows(root: Path, subject: int) -> tuple[dict[str, np.ndarray], dict[int, tuple[str, int]]]:
    """The subject's stimulus arrays by split and where each 73k id is in them (its recipe)."""
    stims = {s: np.load(require(brain_diffuser.array_path(root, subject, s, "stim"), f"Brain-Diffuser {s} stimuli"),
                        mmap_mode="r") for s in ("train", "test")}
    _, found = brain_diffuser.recipe(root, subject, len(stims["train"]), len(stims["test"]))
    return stims, {int(i): (s, k) for s in ("train", "test") for k, i in enumerate(found[s][0])}


def _brain_diffuser(root: Path, subject: int) -> ReleaseStimuli:
    stims, where = _brain_diffuser_rows(root, subject)

    def read(ids: np.ndarray) -> np.ndarray:
        return np.stack([np.clip(np.rint(stims[where[int(i)][0]][where[int(i)][1]]), 0, 255).astype(np.uint8)
                         for i in ids])

    return ReleaseStimuli("brain-diffuser", root, np.array(sorted(where)), read)


def open_stimuli(source: str, path: Path | str, subject: int | None = None) -> ReleaseStimuli:
    """The stimuli of ``source`` at ``path`` (``extract-clip --source/--stimuli``). MindEye1 and
    Brain-Diffuser keep images per subject: ``subject`` is required for them."""
    path = Path(path)
    if source == "mindeye2":
        return _mindeye2(path)
    if source in ("mindeye1", "brain-diffuser"):
        if subject is None:
            raise UserError(f"--source {source}: its images are stored per subject; give --subject")
        return (_mindeye1 if source == "mindeye1" else _brain_diffuser)(path, subject)
    raise UserError(f"--source must be mindeye2, mindeye1 or brain-diffuser, not {source!r}")


def _union(parts: list[ReleaseStimuli]) -> ReleaseStimuli:
    """One stimulus set over several subjects' (an id several hold reads from the first)."""
    if len(parts) == 1:
        return parts[0]
    owner = {int(i): k for k in reversed(range(len(parts))) for i in parts[k].ids}

    def read(ids: np.ndarray) -> np.ndarray:
        out = [None] * len(ids)
        for k, part in enumerate(parts):
            mine = [j for j, i in enumerate(ids) if owner[int(i)] == k]
            if mine:
                for j, image in zip(mine, part.read(ids[mine])):
                    out[j] = image
        return np.stack(out)

    return ReleaseStimuli(parts[0].source, parts[0].path, np.array(sorted(owner)), read)


class ReleaseImages:
    """A release's stimuli as :meth:`Dataset.stimuli` gives them: indexable by 73k id, (n, H, W, 3)
    uint8 at the release's native size (floats in [0, 1] rounded to uint8); ids it lacks are a
    one-line error."""

    dtype = np.dtype(np.uint8)

    def __init__(self, stimuli: ReleaseStimuli) -> None:
        self.release = stimuli
        first = stimuli.read(stimuli.ids[:1])
        self.shape = (int(stimuli.ids.max()) + 1, *first.shape[1:])

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.arange(self.shape[0])[ids] if isinstance(ids, slice) else np.atleast_1d(np.asarray(ids, np.int64))
        if not ids.size:
            return np.zeros((0, *self.shape[1:]), np.uint8)
        images = self.release.read(ids)
        if images.dtype.kind == "f":
            images = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
        return images


class ReleaseDataset(DatasetBase):
    """A release as a dataset over its root: stimuli by 73k id (per subject for releases that store
    them per subject: the ``subjects`` given, those of the run's fMRI stores)."""

    split_recipe = SPLIT_RECIPE
    stimuli_per_subject: ClassVar[bool] = True

    def __init__(self, root: Path | str, subjects: Sequence[int] | None = None) -> None:
        self.root = Path(root)
        self.subjects = sorted(set(subjects or ()))
        if not self.root.exists():
            raise UserError(f"{self.name} release root not found: {self.root}")

    @cached_property
    def release_stimuli(self) -> ReleaseStimuli:
        """The release's images, opened once per dataset object (MindEye1's tars are read whole)."""
        if not self.stimuli_per_subject:
            return open_stimuli(self.name, self.root)
        if not self.subjects:
            raise UserError(f"dataset {self.name!r} stores its images per subject: name the subjects")
        return _union([open_stimuli(self.name, self.root, s) for s in self.subjects])

    @contextmanager
    def stimuli(self) -> Iterator[ReleaseImages]:
        yield ReleaseImages(self.release_stimuli)


class MindEye2(ReleaseDataset):
    """MindEye2's release: every 73k image, 224 px float16 (``coco_images_224_float16.hdf5``)."""

    name = "mindeye2"
    image_size = 224
    stimuli_per_subject = False


class MindEye1(ReleaseDataset):
    """MindEye1's ``webdataset_avg_split``: each subject's images as 256-px jpgs in its tars."""

    name = "mindeye1"
    image_size = 256


class BrainDiffuser(ReleaseDataset):
    """Brain-Diffuser's arrays: each subject's images at 425 px, and their captions."""

    name = "brain-diffuser"
    image_size = 425

    def captions(self, image_ids: Sequence[int], per_image: int = 5) -> np.ndarray:
        """(n, per_image) str captions from ``nsd_{train,test}_cap_subN.npy``, '' where fewer."""
        ids = np.asarray(image_ids, np.int64)
        out = np.full((len(ids), per_image), "", dtype=object)
        found = np.zeros(len(ids), bool)
        for subject in self.subjects:
            _, where = _brain_diffuser_rows(self.root, subject)
            caps = {s: np.load(require(brain_diffuser.array_path(self.root, subject, s, "cap"),
                                       f"Brain-Diffuser {s} captions"), allow_pickle=False) for s in ("train", "test")}
            for j, i in enumerate(ids):
                if not found[j] and int(i) in where:
                    split, k = where[int(i)]
                    row = [str(c).strip() for c in np.atleast_1d(caps[split][k]) if str(c).strip()][:per_image]
                    out[j, : len(row)] = row
                    found[j] = True
        if not found.all():
            raise UserError(f"{self.root}: no Brain-Diffuser captions for 73k id {int(ids[~found][0])} "
                            f"(subjects {self.subjects})")
        return out.astype(str)
