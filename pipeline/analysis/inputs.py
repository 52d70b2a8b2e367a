"""analyze-layers' inputs: the fMRI store(s) reduced to per-image betas and ROI voxel sets, and the
CLIP cache's layers reduced to one feature vector per image.

fMRI stores come in three shapes, all accepted (see :func:`load_split`): one row per image
(``prepare-fmri`` default; ``n_repeats`` says how many trials each row averages), one row per
trial (``--repeats trials``; ``trial_ids``), or trials for train and averages for test.
Encoding models and RDMs always use one row per image (trials are averaged here); the noise
ceiling needs single trials, taken from every trial-level split of ``--fmri`` and of the optional
``--fmri-trials`` store (:func:`trial_sources`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ..errors import UserError
from ..features.cache import open_cache
from ..fitting.pairs import roi_names
from ..store import open_existing, row_bytes, take_rows
from .encoding import average_by_image, standardizer

SPLITS = ("train", "test")
SIZES_SUFFIX = "__sizes"
"""``layers/<name>__sizes``: merged-token sizes written beside ``merge:K`` layers (metadata, not a layer)."""
FEATURES = ("mean", "cls", "flatten")
FLOC_PREFIX = "floc-"
SLAB_BYTES = 256 << 20
"""Rows of a layer read at once: bounds memory for all-token caches (ViT-L/14: ~500 rows)."""
GRAM_BLOCK_BYTES = 2 << 30
"""``--features flatten``: float32 bytes of one column block (every image, a run of tokens) held at
once; each block is one more read of the layer (subj01, ViT-L/14: 49 tokens, 6 reads)."""
STATS_COLUMNS = 4096
"""Columns standardised at a time (bounds the float64 temporaries of their mean and std)."""


# ---- fMRI ------------------------------------------------------------------------------------------
@dataclass
class Split:
    """One split of an fMRI store, one row per image."""

    image_ids: np.ndarray  # (n,) sorted 0-based 73k ids
    betas: np.ndarray  # (n, V) float32, the mean of each image's trials
    trials: np.ndarray | None  # (n,) trials averaged per image; None when the store does not say


def _require(group: zarr.Group, path: Path, split: str) -> None:
    for name in ("betas", "image_ids"):
        if f"{split}/{name}" not in group:
            raise UserError(f"{path}: no {split}/{name}; is it an fMRI cache made by prepare-fmri?")


def is_trial_level(group: zarr.Group, split: str) -> bool:
    ids = group[f"{split}/image_ids"][...]
    return f"{split}/trial_ids" in group or len(np.unique(ids)) < len(ids)


def load_split(group: zarr.Group, path: Path, split: str) -> Split:
    """A split averaged per image (betas checked finite)."""
    _require(group, path, split)
    ids = group[f"{split}/image_ids"][...]
    betas = group[f"{split}/betas"][...]
    if len(ids) != len(betas):
        raise UserError(f"{path}: {split}/image_ids and {split}/betas differ in length")
    if not np.isfinite(betas).all():
        bad = np.unique(np.nonzero(~np.isfinite(betas))[1])
        raise UserError(f"{path}: {split}/betas has NaN/inf in {len(bad)} voxels (first: {bad[:5].tolist()})")
    ids_u, mean, counts = average_by_image(betas, ids)
    if is_trial_level(group, split):
        trials = counts
    elif f"{split}/n_repeats" in group:
        trials = group[f"{split}/n_repeats"][...][np.argsort(ids, kind="stable")]
    else:
        trials = None
    return Split(ids_u, mean, trials)


def open_fmri(path: Path | str) -> zarr.Group:
    path = Path(path)
    group = open_existing(path, "fMRI cache")
    for split in SPLITS:
        _require(group, path, split)
    return group


def trial_sources(main: zarr.Group, main_path: Path, extra: zarr.Group | None, extra_path: Path | None
                  ) -> list[tuple[zarr.Group, Path, str]]:
    """Every single-trial split available for the noise ceiling: ``extra`` (``--fmri-trials``, which
    must be a per-trial store of the same subject and voxels) when given, else the trial-level
    splits of the main store."""
    if extra is None:
        return [(main, main_path, s) for s in SPLITS if is_trial_level(main, s)]
    if extra.attrs.get("subject") != main.attrs.get("subject"):
        raise UserError(
            f"--fmri-trials {extra_path} holds subject {extra.attrs.get('subject')}, "
            f"--fmri {main_path} subject {main.attrs.get('subject')}"
        )
    for split in SPLITS:
        _require(extra, extra_path, split)
        if extra[f"{split}/betas"].shape[1] != main[f"{split}/betas"].shape[1]:
            raise UserError(f"--fmri-trials {extra_path}: {extra[f'{split}/betas'].shape[1]} voxels, "
                            f"--fmri {main_path} has {main[f'{split}/betas'].shape[1]}")
        if not is_trial_level(extra, split):
            raise UserError(f"--fmri-trials {extra_path}: {split} holds one row per image; make it with "
                            "prepare-fmri --repeats trials")
    return [(extra, extra_path, s) for s in SPLITS]


def read_trials(group: zarr.Group, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's single-trial betas (n_trials, V) and image ids, checked finite."""
    betas = group[f"{split}/betas"][...]
    if not np.isfinite(betas).all():
        raise UserError(f"{path}: {split}/betas has NaN/inf values")
    return betas, group[f"{split}/image_ids"][...]


# ---- ROIs ------------------------------------------------------------------------------------------
def select_roi_files(group: zarr.Group, path: Path, wanted: list[str] | None) -> list[str]:
    """``--rois``: ROI file names (``floc`` = every ``floc-*`` file); default all of them."""
    files = roi_names(group)
    if not files:
        raise UserError(f"{path}: no voxels/<roi> arrays; is it an fMRI cache made by prepare-fmri?")
    if not wanted:
        return files
    chosen: list[str] = []
    for name in wanted:
        names = [f for f in files if f.startswith(FLOC_PREFIX)] if name == "floc" else [name]
        if name not in files and not (name == "floc" and names):
            raise UserError(f"--rois: {path} has no ROI {name!r} (has {', '.join(files)}, or floc)")
        chosen += [n for n in names if n not in chosen]
    return chosen


def roi_sets(group: zarr.Group, files: list[str], min_voxels: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Voxel indices per ROI key, and the keys skipped for having fewer than ``min_voxels`` voxels.

    Keys: ``<file>`` (union of its labels), ``<file>/<label>`` (files with several labels) and
    ``floc`` (union of every ``floc-*`` file given), in file order.
    """
    sets: dict[str, np.ndarray] = {}
    skipped: list[str] = []

    def add(key: str, idx: np.ndarray) -> None:
        (sets.__setitem__(key, idx) if len(idx) >= min_voxels else skipped.append(key))

    floc = [f for f in files if f.startswith(FLOC_PREFIX)]
    for name in files:
        arr = group[f"voxels/{name}"]
        labels = arr[...]
        add(name, np.flatnonzero(labels > 0))
        names = {int(k): v for k, v in (arr.attrs.get("labels") or {}).items()}
        values = [int(v) for v in np.unique(labels[labels > 0])]
        if len(values) > 1:
            for v in values:
                add(f"{name}/{names.get(v, v)}", np.flatnonzero(labels == v))
        if floc and name == floc[-1]:
            add("floc", np.flatnonzero(np.any([group[f"voxels/{f}"][...] > 0 for f in floc], axis=0)))
    return sets, skipped


# ---- CLIP layers -----------------------------------------------------------------------------------
_NAME_RE = re.compile(r"^(\d+)(?:-(\d+))?")


def layer_blocks(clip: zarr.Group, name: str) -> tuple[int, ...]:
    """The 1-based blocks a cached layer covers (from the cache's attrs, else from its name)."""
    info = (clip.attrs.get("layers") or {}).get(name) or {}
    if info.get("blocks"):
        return tuple(int(b) for b in info["blocks"])
    m = _NAME_RE.match(name)
    if not m:
        return ()
    lo, hi = int(m[1]), int(m[2] or m[1])
    return tuple(range(lo, hi + 1))


def is_single_block(name: str) -> bool:
    """A plain block output (``16``), not an aggregate (``11-20_mean``) or a projection (``24_proj``)."""
    return name.isdigit()


def cached_layers(clip: zarr.Group) -> list[str]:
    """Every ``layers/*`` array name (``__sizes`` metadata skipped), in block order."""
    names = [n for n in (clip["layers"].array_keys() if "layers" in clip else []) if not n.endswith(SIZES_SUFFIX)]

    def key(name: str) -> tuple:
        blocks = layer_blocks(clip, name) or (10**6,)
        return (blocks[0], blocks[-1], not is_single_block(name), name)

    return sorted(names, key=key)


def select_layers(clip: zarr.Group, path: Path, wanted: list[str] | None) -> list[str]:
    """``--layers``: cached names (``3``, ``2-4_mean``) or extract-clip specs (``2-4:mean``), block order."""
    known = cached_layers(clip)
    if not known:
        raise UserError(f"{path}: the CLIP cache has no layers/* arrays; extract them with extract-clip --layers ...")
    if not wanted:
        return known
    names = []
    for item in wanted:
        name = item.removeprefix("layers/").replace(":", "_")
        if name not in known:
            raise UserError(f"--layers: {path} has no layer {item!r} (has {', '.join(known)})")
        names.append(name)
    return [n for n in known if n in names]


def open_clip_cache(path: Path | str, image_ids: np.ndarray) -> zarr.Group:
    """The CLIP cache, refused when any of ``image_ids`` is outside it or not extracted yet."""
    path = Path(path)
    group = open_existing(path, "CLIP cache")
    n = group["image_embeds"].shape[0] if "image_embeds" in group else None
    if n is not None and len(image_ids) and (image_ids.min() < 0 or image_ids.max() >= n):
        raise UserError(f"{path}: fMRI image ids reach {image_ids.max()} but the cache has rows 0..{n - 1}; "
                        "were the two caches made from the same NSD stimuli?")
    return open_cache(path, rows=image_ids)


def check_features(clip: zarr.Group, path: Path, features: str) -> str:
    """The cache's token mode, checked to allow ``features`` (one of :data:`FEATURES`)."""
    tokens = str(clip.attrs.get("tokens", "all"))
    if features == "mean" and tokens == "cls":
        raise UserError(f"--features mean: {path} holds only the CLS token (--tokens cls); use --features cls")
    if features == "cls" and tokens == "mean":
        raise UserError(f"--features cls: {path} holds only the patch mean (--tokens mean); use --features mean")
    return tokens


def _reduce(block: np.ndarray, sizes: np.ndarray | None, features: str, tokens: str) -> np.ndarray:
    """(b, T, C) tokens -> (b, F) float32 features."""
    block = block.astype(np.float32)
    if features == "flatten":
        return block.reshape(len(block), -1)
    if features == "cls" or tokens in ("mean", "cls"):  # one stored token: CLS or the patch mean
        return block[:, 0]
    patches = block[:, 1:]  # all, grid:K and merge:K keep CLS first
    if sizes is None:
        return patches.mean(1)
    w = sizes[:, 1:].astype(np.float32)
    return (patches * w[..., None]).sum(1) / w.sum(1, keepdims=True)


def layer_features(clip: zarr.Group, name: str, rows: np.ndarray, features: str, tokens: str) -> np.ndarray:
    """(len(rows), F) float32 features of one layer for ``rows`` (sorted unique ids), read in slabs."""
    arr = clip[f"layers/{name}"]
    key = f"layers/{name}{SIZES_SUFFIX}"
    sizes = clip[key] if key in clip else None
    row_bytes = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
    step = max(1, SLAB_BYTES // row_bytes)
    parts = []
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        block = take_rows(arr, part)
        parts.append(_reduce(block, None if sizes is None else take_rows(sizes, part), features, tokens))
    return np.concatenate(parts)


@dataclass
class FlatGrams:
    """What analyze-layers needs of a flattened layer, without its (images x tokens*channels) matrix."""

    gram: np.ndarray  # (n, n) float32: Z Z^T of the features z-scored with the training rows' statistics
    test_gram: np.ndarray  # (n_test, n_test) float64: X X^T of the raw test features (RDM, CKA)
    test_sums: np.ndarray  # (n_test,) float64: each raw test row's sum (the RDM's row means)
    n_features: int


def flatten_grams(clip: zarr.Group, name: str, rows: np.ndarray, pos_train: np.ndarray, pos_test: np.ndarray,
                  block_bytes: int = GRAM_BLOCK_BYTES) -> FlatGrams:
    """:class:`FlatGrams` of one layer for ``rows`` (sorted unique ids; ``pos_*`` index them).

    The flattened features are never held whole: column blocks spanning whole tokens (every
    image, ``block_bytes`` of float32) are read in row slabs, standardised per column (statistics
    are per column, so a block needs only itself) and added into the Gram matrices, the big one in
    float32 and the test one in float64, as the direct RDM and CKA compute.
    """
    arr = clip[f"layers/{name}"]
    n_tokens = int(arr.shape[1]) if arr.ndim > 2 else 1
    channels = int(np.prod(arr.shape[1:])) // n_tokens
    per_token = len(rows) * channels * 4
    step = max(1, min(n_tokens, block_bytes // per_token))
    row_step = max(1, SLAB_BYTES // row_bytes(arr))
    gram = np.zeros((len(rows), len(rows)), np.float32)
    test_gram = np.zeros((len(pos_test), len(pos_test)))
    test_sums = np.zeros(len(pos_test))
    for t0 in range(0, n_tokens, step):
        tokens = slice(t0, min(n_tokens, t0 + step))
        block = np.empty((len(rows), (tokens.stop - t0) * channels), np.float32)
        for start in range(0, len(rows), row_step):
            part = take_rows(arr, rows[start : start + row_step]).reshape(-1, n_tokens, channels)
            block[start : start + len(part)] = part[:, tokens].reshape(len(part), -1)
        for c0 in range(0, block.shape[1], STATS_COLUMNS):
            cols = block[:, c0 : c0 + STATS_COLUMNS]  # a view: standardised in place
            test = cols[pos_test].astype(np.float64)
            test_gram += test @ test.T
            test_sums += test.sum(1)
            mean, scale = standardizer(cols[pos_train])
            cols -= mean
            cols *= scale
        gram += block @ block.T  # numpy runs X X^T as one symmetric rank-k update
        del block
    return FlatGrams(gram, test_gram, test_sums, n_tokens * channels)
