"""prepare-fmri --source god: one GOD subject -> the fMRI store every stage reads, plus the image brick.

Rows: ``train`` = the training perception samples (one row per sample, as the papers train), ``test``
= the test perception samples averaged per image (``test/n_repeats``); imagery is not written. The
``image_ids`` of both are rows of the GOD stimulus set in :func:`pipeline.data.god.stimulus_order`
(sorted training ids, then sorted test ids), the rows of the image brick
(:data:`pipeline.data.god.BRICK`, written beside the store's folder unless given) and so of the CLIP
cache extract-clip makes from it. The store's attrs record ``dataset: god``, ``stimulus_ids`` (row ->
GOD id), the normalisation and the ROIs; ``voxels/<ROI>`` (V1 .. VC, 1 = in the ROI; they overlap as
GOD's do) serve the adapters' ROI options (e.g. mclip ``semantic_rois: [HVC]``) and ``voxels/xyz`` keeps
the release's coordinates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import UserError
from ..store import atomic_store
from .fmri import row_array
from .god import BRICK, GOD, ROIS, GODDataset, stimulus_order, synset_of

NORMALIZE_DETAIL = {
    "train": "per voxel, mean and std (ddof=1) of the training samples, applied to every split "
             "(the dataset's own decoders)",
    "run": "per voxel within each run (DataType, Run), population std",
    "none": "none (the release's values)",
}


def prepare_god(root: Path | str, subject: int, out: Path | str, *, rois: Sequence[str] = ("VC",),
                normalize: str = "train", images: Path | str | None = None,
                brick: Path | str | None = None) -> Path:
    """Write ``subject``'s store at ``out`` and, when absent, the image brick (``brick``, default
    ``<out's folder>/god_stimuli.hdf5``) from ``images`` (default ``<root>/images``).

    ``root``: the folder of ``Subject{n}.h5`` (or its ``fmri/`` subfolder holds them). An existing
    brick of other stimuli is refused (its rows would not match the store's ids)."""
    root = Path(root)
    fmri_root = root / "fmri" if not list(root.glob("Subject*.h5")) and (root / "fmri").is_dir() else root
    god = GOD(fmri_root, Path(images) if images else root / "images")
    train = god.split(subject, "train", rois, normalize)
    test = god.split(subject, "test", rois, normalize)
    shared = sorted({synset_of(s) for s in train.stimuli} & {synset_of(s) for s in test.stimuli})
    if shared:
        raise UserError(f"{len(shared)} GOD test categories also have training samples (not zero-shot): "
                        f"{', '.join(shared[:5])}")
    order = stimulus_order(train.stimuli, test.stimuli)
    row = {s: i for i, s in enumerate(order)}
    brick = Path(brick) if brick else Path(out).parent / BRICK
    if brick.is_file():
        if GODDataset(brick).stimulus_ids() != order:
            raise UserError(f"{brick} holds other GOD stimuli than subject {subject}'s; remove it or write the store "
                            "elsewhere")
    else:
        god.write_image_brick(order, brick)
    data = god.bdata(subject)
    mask = god.voxels(subject, rois)
    members = {name: data.columns(f"ROI_{name}")[mask].astype(np.int32) for name in ROIS if f"ROI_{name}" in data.keys}
    shown = Counter(_raw_test(god, subject, rois))  # one pass: samples per test image, before averaging
    counts = np.array([shown[t] for t in test.stimuli], np.int64)
    with atomic_store(Path(out)) as store:
        for split, part in (("train", train), ("test", test)):
            row_array(store, f"{split}/betas", part.betas.shape, np.float32)[...] = part.betas
            row_array(store, f"{split}/image_ids", (len(part.stimuli),), np.int64)[...] = [row[s] for s in part.stimuli]
        row_array(store, "test/n_repeats", counts.shape, np.int64)[...] = counts
        n_vox = int(mask.sum())
        for name, inside in members.items():  # GOD's ROIs overlap (V1 is in LVC and VC): one file each
            arr = row_array(store, f"voxels/{name}", (n_vox,), np.int32)
            arr[...] = inside
            arr.attrs["labels"] = {"1": name}
        row_array(store, "voxels/xyz", (n_vox, 3), np.float32)[...] = god.voxel_xyz(subject, rois)
        row_array(store, "voxels/invalid_sessions", (n_vox,), np.int32)[...] = 0
        store.attrs.update({
            "dataset": "god",
            "subject": subject,
            "rois": list(members),
            "god_rois": list(rois),
            "zscore": normalize,
            "zscore_detail": NORMALIZE_DETAIL[normalize],
            "repeats": "train-trials",
            "repeats_detail": "train: one row per training perception sample; test: one row per image, the mean "
                              "of its test perception samples",
            "split": "GOD DataType: 1 training perception = train, 2 test perception = test (imagery not written)",
            "stimulus_ids": order,
            "stimuli": str(brick),
            "sources": {"root": str(root), "bdata": str(data.path)},
            "package_version": __version__,
        })
    return Path(out)


def _raw_test(god: GOD, subject: int, rois: Sequence[str]) -> tuple[str, ...]:
    """Test perception stimulus id per sample (before averaging)."""
    return god.split(subject, "test", rois, "none", average=False).stimuli
