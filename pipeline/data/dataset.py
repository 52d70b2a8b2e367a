"""The Dataset protocol: what the rest of the pipeline asks of a dataset, whatever its files.

A dataset answers, by stimulus id (a row number of its stimulus set, e.g. NSD's 0-based 73k ids):

- :meth:`Dataset.stimuli`: a context manager yielding an indexable (n, H, W, 3) uint8 array of its
  images at their native size (read it in batches with :func:`pipeline.store.take_rows`);
- :meth:`Dataset.sessions`, :meth:`Dataset.trials`, :meth:`Dataset.voxels`,
  :meth:`Dataset.read_session`, :meth:`Dataset.store_attrs`: one subject's sessions, chronological
  trial table (stimulus ids, test flags from :attr:`Dataset.split_recipe`, rows per session), voxel
  metadata (ijk, ROI labels), betas ((T, V) float32 per session) and provenance, as prepare-fmri
  needs them;
- :meth:`Dataset.captions`, :meth:`Dataset.categories`: text and category labels of stimuli.

:class:`DatasetBase` implements every question a dataset cannot answer as one :class:`UserError`
naming the dataset, so a new dataset implements only what it has (a stimulus-only image set needs
:meth:`stimuli` alone). Datasets are registered by name in :mod:`pipeline.data.registry` and opened
with :func:`pipeline.data.registry.open_dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Trials:
    """Chronological trial table of the sessions asked for: one entry per trial (= betas row)."""

    image_ids: np.ndarray  # (n,) stimulus id of each trial
    is_test: np.ndarray  # (n,) bool: the split recipe applied
    session_bounds: list[tuple[int, int]]  # [start, stop) trial range per session


@dataclass(frozen=True)
class Voxels:
    """One subject's voxels, in the order :meth:`Dataset.read_session` returns their columns."""

    ijk: np.ndarray | None  # (V, 3) int32 volume indices, None for surface data
    rois: dict[str, np.ndarray]  # per ROI file: (V,) int32 labels, 0 = unlabelled
    roi_labels: dict[str, dict[int, str]]  # per ROI file: label value -> name ({} when unnamed)
    mask: np.ndarray | None = None  # (X, Y, Z) bool volume the voxels come from (C order), if any

    @property
    def n(self) -> int:
        return len(self.ijk) if self.ijk is not None else len(next(iter(self.rois.values())))


class Dataset(Protocol):
    """What a dataset answers; see the module docstring."""

    name: ClassVar[str]
    split_recipe: ClassVar[str]
    image_size: ClassVar[int | None]
    stimuli_per_subject: ClassVar[bool]
    root: Path

    def stimuli(self) -> AbstractContextManager[Any]: ...
    def sessions(self, subject: int) -> list[int]: ...
    def trials(self, subject: int, sessions: Sequence[int]) -> Trials: ...
    def voxels(self, subject: int) -> Voxels: ...
    def read_session(self, subject: int, session: int, voxels: Voxels) -> np.ndarray: ...
    def store_attrs(self, subject: int, sessions: Sequence[int], voxels: Voxels) -> dict: ...
    def captions(self, image_ids: Sequence[int], per_image: int = 5) -> np.ndarray: ...
    def categories(self, image_ids: Sequence[int]) -> tuple[list[str], np.ndarray]: ...


class DatasetBase:
    """Defaults of the protocol: every question is a one-line error naming the dataset."""

    name: ClassVar[str] = "dataset"
    split_recipe: ClassVar[str] = "none: this dataset has no train/test split"
    image_size: ClassVar[int | None] = None
    """The size (px) its images are published at, when the dataset fixes one (MindEye2's 224): evaluate
    then says at which size PixCorr/SSIM were computed. None: not declared (NSD's own, 425 px)."""
    stimuli_per_subject: ClassVar[bool] = False
    """True: each subject holds its own images, and the dataset is opened with ``subjects=``."""
    root: Path

    def _lacks(self, what: str) -> UserError:
        return UserError(f"dataset {self.name!r} has no {what}")

    def stimuli(self) -> AbstractContextManager[Any]:
        raise self._lacks("image stimuli")

    def sessions(self, subject: int) -> list[int]:
        raise self._lacks("fMRI sessions")

    def trials(self, subject: int, sessions: Sequence[int]) -> Trials:
        raise self._lacks("fMRI trials")

    def voxels(self, subject: int) -> Voxels:
        raise self._lacks("voxel metadata")

    def read_session(self, subject: int, session: int, voxels: Voxels) -> np.ndarray:
        raise self._lacks("fMRI betas")

    def store_attrs(self, subject: int, sessions: Sequence[int], voxels: Voxels) -> dict:
        """What an fMRI store records about its source: the ROI files and the root, as given."""
        return {"rois": list(voxels.rois), "sources": {"root": str(self.root)}}

    def captions(self, image_ids: Sequence[int], per_image: int = 5) -> np.ndarray:
        raise self._lacks("captions")

    def categories(self, image_ids: Sequence[int]) -> tuple[list[str], np.ndarray]:
        raise self._lacks("category labels")
