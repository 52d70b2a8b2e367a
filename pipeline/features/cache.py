"""The CLIP features cache (``cache/clip/<model>__<pretrained>.zarr``): layout, creation, resume, reading.

Layout (rows are always all N stimuli of ``imgBrick``: row i is the 0-based 73k id i, so every
subject's trials index the same store):

- ``layers/<name>``  (N, T, C) float16: block outputs, names and token modes as in
  :mod:`pipeline.features.clip` (CLS first, then patches in raster order); C is the tower's
  width, or the embedding width D for projected blocks (``layers/24_proj``);
- ``layers/<name>__sizes`` (N, T) int16, with ``merge:K`` only: how many original tokens each
  merged token holds (CLS = 1; a row sums to 1 + P). Metadata, never a stage-2 target;
- ``image_embeds``   (N, D) float32: ``encode_image`` (pooled, projected, not normalised);
- ``text_embeds``    (N, K, D) float32: CLIP text embeddings of each image's K=5 captions (zeros where
  an image has fewer), only when captions are used;
- ``shard_done``     (n_shards,) bool: every array holds the final values of shard s's rows.

A store of a release that holds only some images (MindEye1's and Brain-Diffuser's: each subject's)
records them in ``attrs["stimulus_ids"]``; the other rows stay 0 and are never filled.

Layers are stored as float16 whatever ``--dtype`` computes in; embeddings as float32. The unit of
work is the shard (``shard_rows`` consecutive rows; one file per array); the rows of shards not yet
flagged in ``shard_done`` are 0 and :func:`filled_rows` says which rows are valid. Writing them is
:mod:`pipeline.features.shards`' job.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ..errors import UserError
from ..store import atomic_store, compressor, open_existing
from . import clip

FORMAT_VERSION = 2
"""Bumped when the meaning of stored values changes, so an old store is refused, not resumed
(2: the activation follows the weights' QuickGELU flag; version-1 stores of OpenAI weights hold
GELU-tower features)."""
CAPTIONS_PER_IMAGE = 5
SHARD_ROWS = 1024
"""ViT-L/14, all tokens: 0.5 GB per layer shard, 72 shards for NSD's 73k images."""
CHUNK_BYTES = 1 << 20
"""Default chunk: the most rows that fit in 1 MiB (1 image for ViT-L/14 all tokens, more when reduced)."""
DONE = "shard_done"


# ---- store layout -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArraySpec:
    """Shape, storage dtype and row chunking of one cached array."""

    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int
    shard_rows: int

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize


def default_chunk_rows(row_bytes: int, shard_rows: int) -> int:
    """The largest divisor of ``shard_rows`` whose chunk stays within :data:`CHUNK_BYTES` (at least 1)."""
    return max(d for d in range(1, shard_rows + 1) if shard_rows % d == 0 and (d == 1 or d * row_bytes <= CHUNK_BYTES))


def store_layout(
    loaded: clip.LoadedModel, layers: list[clip.LayerSpec], tokens: clip.TokenMode, n: int,
    shard_rows: int, chunk_rows: int | None, captions: bool,
) -> dict[str, ArraySpec]:
    """Every array of the store, by path; embeddings use one chunk per shard (they are small)."""
    t, d = tokens.n_tokens(loaded.n_patches), loaded.embed_dim
    if any(layer.project for layer in layers):
        loaded.check_projection()
    widths = {layer.name: d if layer.project else loaded.width for layer in layers}
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(t * max(widths.values()) * 2, shard_rows)
    elif chunk_rows < 1 or shard_rows % chunk_rows:
        raise UserError(f"--chunk-rows {chunk_rows} must be >= 1 and divide --shard-rows {shard_rows}")
    specs = {}
    for layer in layers:
        specs[f"layers/{layer.name}"] = ArraySpec((n, t, widths[layer.name]), "float16", chunk_rows, shard_rows)
        if tokens.has_sizes:
            specs[f"layers/{layer.name}{clip.SIZES_SUFFIX}"] = ArraySpec((n, t), "int16", shard_rows, shard_rows)
    specs["image_embeds"] = ArraySpec((n, d), "float32", shard_rows, shard_rows)
    if captions:
        specs["text_embeds"] = ArraySpec((n, CAPTIONS_PER_IMAGE, d), "float32", shard_rows, shard_rows)
    return specs


def n_shards(n: int, shard_rows: int) -> int:
    return -(-n // shard_rows)


def shard_bounds(s: int, shard_rows: int, n: int) -> tuple[int, int]:
    return s * shard_rows, min((s + 1) * shard_rows, n)


def projected_bytes(layout: dict[str, ArraySpec], rows: int) -> int:
    """Uncompressed bytes of ``rows`` rows in every array: an upper bound of what they take on disk
    (blosc stores incompressible blocks as they are)."""
    return rows * sum(spec.row_bytes for spec in layout.values())


def create_store(out: Path, layout: dict[str, ArraySpec], attrs: dict) -> None:
    """The empty store (metadata only), created atomically: it exists complete or not at all."""
    n = next(iter(layout.values())).shape[0]
    shard_rows = next(iter(layout.values())).shard_rows
    with atomic_store(out) as root:
        for path, spec in layout.items():
            root.create_array(
                path, shape=spec.shape, dtype=spec.dtype, fill_value=0,
                chunks=(spec.chunk_rows, *spec.shape[1:]), shards=(spec.shard_rows, *spec.shape[1:]),
                compressors=[compressor()],
                config={"write_empty_chunks": True},  # every shard on disk, so a missing one is damage
            )
        done = root.create_array(DONE, shape=(n_shards(n, shard_rows),), dtype=bool, chunks=(1,), fill_value=False)
        done.attrs["shard_rows"] = shard_rows
        root.attrs.update(attrs)


def existing_store(out: Path, settings: dict, overwrite: bool) -> zarr.Group | None:
    """The store at ``out`` if it was made with these settings (resume); None if there is none.

    Other settings are refused, or, with ``overwrite``, the old store is deleted.
    """
    if not out.exists():
        return None
    try:
        group = zarr.open_group(out, mode="r+")
        theirs = group.attrs.get("settings")
    except Exception:  # not a Zarr group at all
        group, theirs = None, None
    if theirs == settings:
        return group
    if overwrite:
        shutil.rmtree(out)
        return None
    if theirs is None:
        raise UserError(f"--out {out} exists but is not an extract-clip store; delete it or choose another --out")
    diffs = [f"{k}: {theirs.get(k)!r} there, {settings[k]!r} now" for k in settings if theirs.get(k) != settings.get(k)]
    shown = "; ".join(d if len(d) < 200 else d[:197] + "..." for d in diffs[:3])
    raise UserError(
        f"--out {out} was made with other settings ({shown}); pass --overwrite to rebuild it, or choose another --out"
    )


def clear_shard(root: Path, arrays: dict[str, zarr.Array], s: int) -> None:
    """Delete what an interrupted writer may have left of shard ``s``: its objects and partial files.

    zarr reads an existing shard before rewriting it, so a torn one must go first.
    """
    for arr in arrays.values():
        key = root / arr.path / arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))
        key.unlink(missing_ok=True)
        for stray in key.parent.glob(f"{key.name}.*.partial"):  # LocalStore's atomic-write temp files
            stray.unlink(missing_ok=True)



# ---- reading a finished store ---------------------------------------------------------------------
def filled_rows(group: zarr.Group) -> np.ndarray:
    """(N,) bool: rows whose shard is complete, and that have an image (``stimulus_ids``: the rows
    that do, recorded by a store of a release that holds only some of the 73k images)."""
    done = group[DONE]
    n = group["image_embeds"].shape[0]
    filled = np.repeat(done[:], done.attrs["shard_rows"])[:n]
    held = group.attrs.get("stimulus_ids")
    if held is not None:
        filled &= np.isin(np.arange(n), held)
    return filled


def _id_ranges(ids: np.ndarray, shard_rows: int, n: int) -> list[tuple[int, int]]:
    """Inclusive id ranges of the shards holding ``ids``, consecutive shards merged."""
    ranges: list[list[int]] = []
    for s in np.unique(ids // shard_rows).tolist():
        if ranges and ranges[-1][1] == s - 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    return [(a * shard_rows, min((b + 1) * shard_rows, n) - 1) for a, b in ranges]


def fill_command(group: zarr.Group, path: Path | str, first: int, last: int) -> str:
    """The extract-clip command that resumes this store (same settings) over ids ``first..last``."""
    attrs, settings = group.attrs, group.attrs["settings"]

    def spec(layer: dict) -> str:
        first, last = layer["blocks"][0], layer["blocks"][-1]
        if layer.get("projected"):
            return f"{first}:proj"
        return str(first) if layer["aggregate"] is None else f"{first}-{last}:{layer['aggregate']}"

    args = {
        "--stimuli": attrs["source"]["path"], "--out": str(path),
        "--model": attrs.get("model_source") or attrs["model"],
        "--pretrained": attrs["pretrained"], "--activation": settings["activation"],
        "--layers": ",".join(spec(v) for v in attrs["layers"].values()), "--tokens": settings["tokens"],
        "--dtype": settings["dtype"], "--shard-rows": settings["shard_rows"],
        "--chunk-rows": settings["chunk_rows"], "--images": f"{first}-{last}",
    }
    release = attrs["source"].get("release")
    if release is not None:  # extract-clip --source: per-subject releases fill their subject's images
        args["--source"] = release
        if attrs["source"].get("subject") is not None:
            args["--images"] = f"subject:{attrs['source']['subject']}"
    words = ["python", "cli.py", "extract-clip"] + [w for k, v in args.items() for w in (k, shlex.quote(str(v)))]
    return " ".join(words + ["--captions" if settings["captions"] else "--no-captions"])


def load_cache_model(attrs, device: str) -> clip.LoadedModel:
    """The CLIP model a cache was made with, rebuilt from its attrs: ``model_source`` (the ``--model``
    given: a name or a config JSON's path), ``pretrained`` (a tag or the checkpoint's path as given)
    and the activation. Caches made before ``model_source`` was recorded have only the model's name,
    which does not rebuild a model from a config file. Raises :class:`UserError` when it cannot load."""
    return clip.load_model(attrs.get("model_source") or attrs["model"], attrs["pretrained"], device,
                           activation=attrs.get("activation", "auto"))


def require_rows(group: zarr.Group, path: Path | str, rows: Sequence[int] | np.ndarray | None = None) -> None:
    """Refuse a CLIP cache in which any of ``rows`` (default: all) lies in an unfinished shard.

    The one check every stage-2 reader (fit-adapters, decode, evaluate) makes: a store made with
    ``--images`` or killed half-way has all-zero rows that must never be trained on or scored. The
    error names the missing id ranges and the extract-clip command that fills them.
    """
    if DONE not in group or "settings" not in group.attrs:
        raise UserError(f"{path}: not an extract-clip store (no {DONE} array / settings attribute)")
    filled = filled_rows(group)
    wanted = np.arange(len(filled)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    missing = wanted[~filled[wanted]]
    if not len(missing):
        return
    absent = np.setdiff1d(missing, group.attrs.get("stimulus_ids", missing))
    if len(absent):
        raise UserError(f"{path}: the {group.attrs['source'].get('release')} images it was extracted from have no "
                        f"73k id {int(absent[0])} ({len(absent)} of the {len(wanted)} images this command reads)")
    ranges = _id_ranges(missing, group[DONE].attrs["shard_rows"], len(filled))
    shown = ", ".join(f"{a}-{b}" for a, b in ranges[:4]) + (f" and {len(ranges) - 4} more ranges" if len(ranges) > 4 else "")
    raise UserError(
        f"{path}: images {shown} are not extracted yet ({len(missing)} of the {len(wanted)} images this "
        f"command reads); fill them with: {fill_command(group, path, ranges[0][0], ranges[-1][1])}"
    )


def open_cache(path: Path | str, rows: Sequence[int] | np.ndarray | None = None) -> zarr.Group:
    """Open a CLIP cache for reading, refused (:func:`require_rows`) when ``rows`` (default: all)
    are not all extracted."""
    group = open_existing(Path(path), "CLIP cache")
    require_rows(group, path, rows)
    return group
