"""Stage 2's input: an fMRI cache and a CLIP cache, checked to fit together.

Rows of the fMRI store (``train/betas``) pair with rows of the CLIP store through
``train/image_ids`` (0-based 73k ids = CLIP store row numbers), or, for a video cache made by
prepare-video-fmri, ``train/clip_ids`` (clip ids = rows of the extract-clip --video store);
:func:`row_ids` reads either. Nothing here runs CLIP; target arrays stay lazy zarr arrays, so
callers can stream them in blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ..errors import UserError
from ..features.clip import SIZES_SUFFIX
from ..store import open_existing, take_rows

SPLITS = ("train", "test")
ROW_KEYS = ("image_ids", "clip_ids")
"""The array of an fMRI cache (and of a run's predictions) naming the CLIP-cache row of each row:
NSD's 0-based 73k image ids, or the (segment, TR) clip ids of a video cache."""


def row_key(group, split: str, what: str = "fMRI cache") -> str:
    """Which of :data:`ROW_KEYS` ``group`` (a zarr group or a flat mapping) pairs ``split`` by."""
    found = [k for k in ROW_KEYS if f"{split}/{k}" in group]
    if len(found) != 1:
        raise UserError(f"{what} has {'both' if found else 'neither'} {split}/image_ids {'and' if found else 'nor'} "
                        f"{split}/clip_ids; is it a store made by prepare-fmri or prepare-video-fmri?")
    return found[0]


def row_ids(group, split: str, what: str = "fMRI cache") -> np.ndarray:
    """The CLIP-cache rows of a split's rows (image ids or clip ids)."""
    return group[f"{split}/{row_key(group, split, what)}"][...]


@dataclass
class Pairs:
    """fMRI rows and the CLIP-cache targets they index, for one subject."""

    fmri: zarr.Group
    clip: zarr.Group
    fmri_path: Path
    clip_path: Path
    targets: list[str]

    def betas(self, split: str) -> np.ndarray:
        return self.fmri[f"{split}/betas"][...]

    def image_ids(self, split: str) -> np.ndarray:
        """CLIP-cache rows of a split (image ids; clip ids for a video cache)."""
        return row_ids(self.fmri, split)

    @property
    def row_key(self) -> str:
        return row_key(self.fmri, "test")

    def target(self, name: str) -> zarr.Array:
        """A lazy (N, ...) target array of the CLIP store; index rows with :meth:`image_ids`."""
        return self.clip[name]

    def target_rows(self, name: str, split: str) -> np.ndarray:
        """The target rows of a split's images, in the fMRI store's row order."""
        return take_rows(self.clip[name], self.image_ids(split))

    def roi(self, name: str) -> np.ndarray:
        key = f"voxels/{name}"
        if key not in self.fmri:
            raise UserError(f"{self.fmri_path}: no ROI array {key!r} (has {_members(self.fmri, 'voxels')})")
        return self.fmri[key][...]

    @property
    def subject(self) -> int | None:
        return self.fmri.attrs.get("subject")


def _members(group: zarr.Group, path: str) -> list[str]:
    return sorted(group[path].array_keys()) if path in group else []


def available_targets(clip: zarr.Group) -> list[str]:
    """Every array a stage-2 model can predict: ``image_embeds``, ``text_embeds``, the video cache's
    ``frame_embeds``, ``frames``, ``frame_latents``, and ``layers/<name>`` (not the
    ``layers/<name>__sizes`` metadata of merged tokens)."""
    names = [n for n in ("image_embeds", "text_embeds", "frame_embeds", "frames", "frame_latents") if n in clip]
    return names + [f"layers/{n}" for n in _members(clip, "layers") if not n.endswith(SIZES_SUFFIX)]


def open_pairs(fmri_path: Path | str, clip_path: Path | str, targets: list[str], subject: int | None = None) -> Pairs:
    """Open and cross-check the two caches; every mismatch is one clear :class:`UserError`."""
    fmri_path, clip_path = Path(fmri_path), Path(clip_path)
    fmri = open_existing(fmri_path, "fMRI cache")
    clip = open_existing(clip_path, "CLIP cache")
    for split in SPLITS:
        if f"{split}/betas" not in fmri:
            raise UserError(f"{fmri_path}: no {split}/betas; is it an fMRI cache made by prepare-fmri?")
        row_key(fmri, split)
    store_subject = fmri.attrs.get("subject")
    if subject is not None and store_subject != subject:
        raise UserError(f"{fmri_path} holds subject {store_subject}, not subject {subject}")
    known = available_targets(clip)
    if not targets:
        raise UserError("--targets: name at least one target")
    missing = [t for t in targets if t not in known]
    if missing:
        raise UserError(f"{clip_path}: no target {', '.join(missing)} (available: {', '.join(known) or 'none'})")
    n_rows = {clip[t].shape[0] for t in targets}
    if len(n_rows) != 1:
        raise UserError(f"{clip_path}: targets have different row counts {sorted(n_rows)}")
    n = n_rows.pop()
    if fmri.attrs.get("clip_layout") != clip.attrs.get("clip_layout"):
        raise UserError(f"{fmri_path} and {clip_path} number their rows differently (clip_layout: "
                        f"{fmri.attrs.get('clip_layout')} vs {clip.attrs.get('clip_layout')}); make both with the same "
                        "cc2017 design")
    for split in SPLITS:
        ids = row_ids(fmri, split)
        if len(ids) != fmri[f"{split}/betas"].shape[0]:
            raise UserError(f"{fmri_path}: {split}/{row_key(fmri, split)} and {split}/betas differ in length")
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise UserError(
                f"{fmri_path}: {split} image ids reach {ids.max()} but {clip_path} has rows 0..{n - 1}; "
                "were the two caches made from the same NSD stimuli?"
            )
        _check_filled(clip, clip_path, ids, split)
        betas = fmri[f"{split}/betas"][...]
        if not np.isfinite(betas).all():
            bad = np.unique(np.nonzero(~np.isfinite(betas))[1])
            raise UserError(f"{fmri_path}: {split}/betas has NaN/inf in {len(bad)} voxels (first: {bad[:5].tolist()})")
    return Pairs(fmri, clip, fmri_path, clip_path, list(targets))


def _check_filled(clip: zarr.Group, clip_path: Path, ids: np.ndarray, split: str) -> None:
    """Refuse images whose CLIP rows were never extracted (a partial or ``--images`` subset cache)."""
    if "filled" not in clip:
        return
    filled = clip["filled"][...].astype(bool)
    missing = ids[~filled[ids]]
    if len(missing):
        raise UserError(
            f"{clip_path}: {len(missing)} {split} images were not extracted (first ids {missing[:5].tolist()}); "
            "rerun extract-clip with --images covering them"
        )
