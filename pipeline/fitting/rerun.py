"""A run's test predictions again, from its saved model, with ROIs removed (``evaluate --drop-rois``).

Removing an ROI zeroes its voxels in the (z-scored) test betas, i.e. sets them to their mean, and in
a multi-subject model every unit (ROI token or voxel group) left without voxels reads its learned
missing token (:mod:`.adapters.subjects`), which training with ``roi_dropout`` taught it to decode
without. Names: an ROI file of the store (``floc-faces``, ``prf-visualrois``), one label of a file
(``floc-faces/FFA-1``), or ``floc`` (every ``floc-*`` file); the per-voxel metadata beside the ROI
files (``voxels/ijk``, ``voxels/invalid_sessions``) is not an ROI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..store import open_existing
from .adapters.base import FLOC
from .adapters.subjects import label_values
from .methods import load_method
from .pairs import roi_names
from .run_folder import RunInfo, per_image

ALIASES = {"floc": FLOC}


def _select(voxels: Any, rois: Sequence[str], name: str) -> np.ndarray | None:
    """Voxels of ``name`` among one store's ROI arrays ``rois`` (None: the store does not know it)."""
    file, _, label = name.partition("/")
    present = [f for f in ALIASES.get(name, (file,)) if f in rois]
    if not present:
        return None
    if label:
        value = label_values(voxels[file]).get(label)
        return None if value is None else np.asarray(voxels[file][...]) == value
    return np.any([np.asarray(voxels[f][...]) > 0 for f in present], axis=0)


def dropped_voxels(stores: Mapping[Any, Path], names: Sequence[str]) -> dict[Any, dict[str, np.ndarray]]:
    """Per store, per name, the (V,) mask of voxels that name removes. Only ROI label arrays
    (:func:`.pairs.roi_names`) are ROIs; a name no store knows as one is an error, raised
    before any scoring."""
    out: dict[Any, dict[str, np.ndarray]] = {}
    known, listed = set(), []
    for key, path in stores.items():
        g = open_existing(path, "fMRI cache of the run")
        rois = roi_names(g)
        listed += [r for r in rois if r not in listed]
        n = g["test/betas"].shape[1]
        out[key] = {}
        for name in names:
            sel = _select(g["voxels"], rois, name) if rois else None
            if sel is not None:
                known.add(name)
            out[key][name] = np.zeros(n, bool) if sel is None else sel
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--drop-rois: no ROI {unknown[0]!r} in the run's stores (ROI files: "
                        f"{', '.join(listed) or 'none'}; also 'floc' and '<file>/<label>')")
    return out


def predict_without(run: Path, info: RunInfo, key: str | None, drop: np.ndarray) -> dict[str, np.ndarray]:
    """The run's per-image test predictions for subject ``key`` with the voxels of ``drop`` removed."""
    g = open_existing(info.stores()[key], "fMRI cache of the run")
    betas, ids = g["test/betas"][...], g["test/image_ids"][...]
    subject = int(key[4:]) if key else None
    return per_image(ids, load_method(run, info).predict(betas, keep=~drop, subject=subject))[2]
