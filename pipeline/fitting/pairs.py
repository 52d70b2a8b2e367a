"""Stage 2's input: an fMRI cache and a CLIP cache, checked to fit together.

Rows of the fMRI store (``train/betas``) pair with rows of the CLIP store through
``train/image_ids`` (0-based 73k ids = CLIP store row numbers), or, for a video cache made by
prepare-video-fmri, ``train/clip_ids`` (clip ids = rows of the extract-clip --video store);
:func:`row_ids` reads either. Nothing here runs CLIP. The betas
and ids are read once, here; target arrays stay lazy zarr arrays, so callers can stream them in
blocks. Every row the pair reads is checked to be extracted (:func:`pipeline.features.cache.require_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import UserError
from ..features.cache import require_rows
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
    loaded: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split -> betas, image_ids

    def betas(self, split: str) -> np.ndarray:
        """(n, V) float32 betas of a split, read from the store once (by :func:`open_pairs`)."""
        return self.loaded[split]["betas"]

    def image_ids(self, split: str) -> np.ndarray:
        """CLIP-cache rows of a split (image ids; clip ids for a video cache)."""
        return self.loaded[split]["image_ids"]

    @property
    def row_key(self) -> str:
        return row_key(self.fmri, "test")

    def target(self, name: str) -> zarr.Array:
        """A lazy (N, ...) target array of the CLIP store; index rows with :meth:`image_ids`."""
        return self.clip[name]

    @property
    def subject(self) -> int | None:
        return self.fmri.attrs.get("subject")


def roi_names(group: zarr.Group) -> list[str]:
    """The ROI label arrays of an fMRI store: the ``voxels/<name>`` arrays that carry a ``labels``
    attribute (:mod:`pipeline.data.fmri` writes one on every ROI file; prepare-video-fmri's
    ``hemisphere`` has one too), not the per-voxel metadata beside them (``ijk``,
    ``invalid_sessions``, ``grayordinate``, ``vertex``). In the store's ``rois`` order, then by name."""
    if "voxels" not in group:
        return []
    voxels = group["voxels"]
    found = [n for n in sorted(voxels.array_keys()) if "labels" in voxels[n].attrs and voxels[n].ndim == 1]
    listed = [r for r in group.attrs.get("rois", []) if r in found]
    return listed + [r for r in found if r not in listed]


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
        row_key(fmri, split, str(fmri_path))
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
    loaded = {split: {"image_ids": row_ids(fmri, split)} for split in SPLITS}
    for split in SPLITS:
        ids = loaded[split]["image_ids"]
        if len(ids) != fmri[f"{split}/betas"].shape[0]:
            raise UserError(f"{fmri_path}: {split}/{row_key(fmri, split)} and {split}/betas differ in length")
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise UserError(
                f"{fmri_path}: {split} image ids reach {ids.max()} but {clip_path} has rows 0..{n - 1}; "
                "were the two caches made from the same NSD stimuli?"
            )
    require_rows(clip, clip_path, np.concatenate([loaded[split]["image_ids"] for split in SPLITS]))
    for split in SPLITS:
        betas = loaded[split]["betas"] = fmri[f"{split}/betas"][...]
        if not np.isfinite(betas).all():
            bad = np.unique(np.nonzero(~np.isfinite(betas))[1])
            raise UserError(f"{fmri_path}: {split}/betas has NaN/inf in {len(bad)} voxels (first: {bad[:5].tolist()})")
    return Pairs(fmri, clip, fmri_path, clip_path, list(targets), loaded)


STORE_SETTINGS = ("zscore", "repeats")
"""fMRI-store settings every store of one model must share (and a fine-tuned model with its pre-training)."""


def store_settings(pairs: Pairs) -> dict[str, object]:
    return {k: pairs.fmri.attrs.get(k) for k in STORE_SETTINGS}


def open_cohort(fmri_paths: list[Path | str], clip_path: Path | str, targets: list[str]) -> list[Pairs]:
    """:func:`open_pairs` for several subjects' stores against one CLIP cache: each subject once, all
    made with the same z-scoring and repeat handling."""
    if not fmri_paths:
        raise UserError("--fmri: give at least one fMRI cache")
    cohort = [open_pairs(p, clip_path, targets) for p in fmri_paths]
    seen: dict[object, Path] = {}
    for pairs in cohort:
        if pairs.subject is None:
            raise UserError(f"{pairs.fmri_path}: the store names no subject (attrs.subject); was it made by prepare-fmri?")
        if pairs.subject in seen:
            raise UserError(f"--fmri: subject {pairs.subject} is given twice ({seen[pairs.subject]} and {pairs.fmri_path}); "
                            "one store per subject")
        seen[pairs.subject] = pairs.fmri_path
    first = store_settings(cohort[0])
    for pairs in cohort[1:]:
        theirs = store_settings(pairs)
        for key in STORE_SETTINGS:
            if theirs[key] != first[key]:
                raise UserError(f"--fmri: {pairs.fmri_path} was made with {key}={theirs[key]!r} but "
                                f"{cohort[0].fmri_path} with {key}={first[key]!r}; prepare every store the same way")
    return cohort


def clip_identity(clip: zarr.Group) -> str:
    """A hash of the CLIP store's settings (model, weights, layers, tokens): runs that may share a model agree on it."""
    import hashlib
    import json

    settings = clip.attrs.get("settings") or {k: clip.attrs.get(k) for k in ("model", "pretrained", "layers", "tokens")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def true_targets(clip: Any, name: str, images: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Rows ``images`` of the CLIP-cache target ``name``, reduced like a prediction of ``shape``
    (several caption embeddings per image -> the mean of those present): what a fit is scored against."""
    rows = take_rows(clip[name], images).astype(np.float32)
    if rows.shape[1:] == shape:
        return rows
    present = np.abs(rows).sum(-1, keepdims=True) > 0
    return (rows * present).sum(1) / np.maximum(present.sum(1), 1)
