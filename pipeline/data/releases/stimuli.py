"""Stimuli of each release by 0-based 73k id, and the pixels the CLIP model sees.

- MindEye2: ``coco_images_224_float16.hdf5`` ``images`` (73000, 3, 224, 224) float16 in [0, 1];
- MindEye1: the 256-px ``jpg`` of each sample of the subject's tars;
- Brain-Diffuser: ``nsd_{train,test}_stim_subN.npy`` (n, 425, 425, 3), ids from its recipe.

What the CLIP model sees of them is :func:`pipeline.features.pixels.to_pixels`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...errors import UserError
from ..nsd import open_hdf5
from . import brain_diffuser, mindeye1
from .common import require, tar_samples

MINDEYE2_IMAGES = "coco_images_224_float16.hdf5"


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


def _brain_diffuser(root: Path, subject: int) -> ReleaseStimuli:
    stims = {s: np.load(require(brain_diffuser.array_path(root, subject, s, "stim"), f"Brain-Diffuser {s} stimuli"),
                        mmap_mode="r") for s in ("train", "test")}
    _, found = brain_diffuser.recipe(root, subject, len(stims["train"]), len(stims["test"]))
    where = {int(i): (s, k) for s in ("train", "test") for k, i in enumerate(found[s][0])}

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
