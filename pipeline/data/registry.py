"""Datasets by name: the one place a reader class is named (specs as data, one factory).

Adding a dataset is one module implementing :class:`~pipeline.data.dataset.Dataset` plus one line
in :data:`DATASETS`. Consumers open what a store or a run names::

    with open_dataset("nsd", root).stimuli() as images: ...

A run is opened on the dataset its fMRI stores record (:func:`run_dataset`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import zarr

from ..errors import UserError
from .cc2017 import CC2017
from .dataset import Dataset
from .god import GODDataset
from .nsd import NSD
from .releases.stimuli import BrainDiffuser, MindEye1, MindEye2

DATASETS: dict[str, type] = {
    "nsd": NSD,
    "cc2017": CC2017,
    "mindeye2": MindEye2,
    "mindeye1": MindEye1,
    "brain-diffuser": BrainDiffuser,
    "god": GODDataset,
}
"""Registered datasets: name -> class taking ``(root, **options)``."""

DEFAULT = "nsd"
"""The dataset of a store or run that names none (every store written before datasets had names)."""


def open_dataset(name: str, root: Path | str, **options: Any) -> Dataset:
    """The dataset ``name`` over ``root``; ``options`` go to its class (e.g. NSD's ``betas``)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
    return DATASETS[name](root, **options)


def dataset_name(attrs: Mapping[str, Any]) -> str:
    """The dataset a store's attrs record (``dataset``), :data:`DEFAULT` when they record none."""
    return str(attrs.get("dataset") or DEFAULT)


def run_dataset(stores: Iterable[Path | str], root: Path | str, name: str | None = None) -> Dataset:
    """The dataset of a run whose fMRI stores are ``stores``, over ``root``: ``name`` when given, else
    the one its stores record (a store that is gone, or records none, counts as NSD's). A dataset
    whose images are stored per subject is opened on the stores' subjects."""
    paths = [Path(p) for p in stores]
    stores = [dict(zarr.open_group(p, mode="r").attrs) if p.is_dir() else {} for p in paths]
    if name is None:
        names = sorted({dataset_name(attrs) for attrs in stores})
        if len(names) > 1:
            raise UserError(f"the run's fMRI stores come from different datasets ({', '.join(names)}); "
                            "name the one whose stimuli to use")
        name = names[0] if names else DEFAULT
    if name in DATASETS and DATASETS[name].stimuli_per_subject:
        return open_dataset(name, root, subjects=[int(a["subject"]) for a in stores if "subject" in a])
    return open_dataset(name, root)


def given_root(root: Path | str | None, nsd_root: Path | str | None) -> Path | str:
    """``root``, or ``nsd_root`` (its name before datasets had names, kept as an alias): exactly one."""
    if (root is None) == (nsd_root is None):
        raise UserError("give the dataset's root once (root, or its alias nsd_root)")
    return root if root is not None else nsd_root
