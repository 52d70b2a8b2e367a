"""Stage 2's training data: fMRI rows paired with CLIP-cache target rows, batches, splits, statistics.

No CLIP runs here: targets are rows of the CLIP cache, indexed by the fMRI cache's image ids.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..store import take_rows
from .adapters.base import CAPTIONS
from .adapters.losses import caption_mean
from .pairs import row_key


def _array_names(store: Mapping[str, Any] | zarr.Group) -> list[str]:
    if isinstance(store, zarr.Group):
        return sorted(name for name, node in store.members(max_depth=None) if isinstance(node, zarr.Array))
    return sorted(store)


class CacheDataset(Dataset):
    """fMRI rows paired with CLIP-cache target rows, read in batches.

    ``betas`` (n, V) and ``image_ids`` (n,) (0-based ids = CLIP-store rows) may be numpy or zarr
    arrays; ``clip`` is a zarr group or any mapping from target names (``layers/<name>``,
    ``image_embeds``, ``text_embeds``) to (N, ...) arrays. ``voxels`` maps ROI names to per-voxel
    labels (the fMRI cache's ``voxels/`` group), needed by ROI-split models. Arrays stay lazy: a
    batch reads only its own rows. Use with :func:`batch_loader` (or a DataLoader with
    ``collate_fn=as_batch``); a batch is ``{"x": (B, V) float32, "image_id": (B,) int64,
    "targets": {name: (B, ...) float32}}``.
    """

    def __init__(
        self,
        betas: Any,
        image_ids: Any,
        clip: Mapping[str, Any] | zarr.Group,
        targets: Sequence[str],
        voxels: Mapping[str, Any] | None = None,
        name: str = "fMRI cache",
    ):
        self.betas, self.clip, self.voxels, self.name = betas, clip, voxels, name
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.rows = np.arange(len(self.image_ids))
        self.targets = list(dict.fromkeys(targets))
        self._check()

    @classmethod
    def from_stores(
        cls,
        fmri: Mapping[str, Any] | zarr.Group,
        clip: Mapping[str, Any] | zarr.Group,
        targets: Sequence[str],
        split: str = "train",
    ) -> CacheDataset:
        """A split (``train`` or ``test``) of an fMRI cache, with ROI labels from its ``voxels/``
        group; ``fmri`` is the zarr group or a flat mapping with the same keys (``train/betas``...)."""
        if f"{split}/betas" not in fmri:
            raise UserError(f"fMRI cache has no {split}/betas; is it a store made by prepare-fmri?")
        rows = f"{split}/{row_key(fmri, split)}"
        if isinstance(fmri, zarr.Group):
            voxels = fmri["voxels"] if "voxels" in fmri else None
        else:
            voxels = {k.removeprefix("voxels/"): v for k, v in fmri.items() if k.startswith("voxels/")} or None
        return cls(
            fmri[f"{split}/betas"], fmri[rows], clip, targets, voxels, name=f"fMRI cache {split}"
        )

    def _check(self) -> None:
        if not self.targets:
            raise UserError("no targets: name at least one CLIP-cache array")
        known = _array_names(self.clip)
        missing = [t for t in self.targets if t not in known]
        if missing:
            raise UserError(f"CLIP cache has no target {missing[0]!r} (available: {', '.join(known) or 'none'})")
        rows = {t: self.clip[t].shape[0] for t in self.targets}
        n = min(rows.values())
        if len(set(rows.values())) != 1:
            raise UserError(f"CLIP cache targets have different row counts: {rows}")
        if self.betas.ndim != 2 or self.betas.shape[0] != len(self.image_ids):
            raise UserError(
                f"{self.name}: betas {tuple(self.betas.shape)} and image_ids ({len(self.image_ids)},) do not pair up"
            )
        if len(self.image_ids) and (self.image_ids.min() < 0 or self.image_ids.max() >= n):
            bad = self.image_ids[(self.image_ids < 0) | (self.image_ids >= n)]
            raise UserError(
                f"{self.name}: image ids {bad[:3].tolist()} are outside the CLIP cache's rows 0..{n - 1}; "
                "were the two caches made from the same stimuli?"
            )
        step = max(1, (64 << 20) // (4 * max(1, self.betas.shape[1])))
        for start in range(0, len(self.image_ids), step):
            block = np.asarray(self.betas[start : start + step])
            if not np.isfinite(block).all():
                bad = np.unique(np.nonzero(~np.isfinite(block))[1])
                raise UserError(f"{self.name}: betas have NaN/inf in {len(bad)} voxels (first: {bad[:5].tolist()})")

    def subset(self, rows: np.ndarray) -> CacheDataset:
        """The same data restricted to ``rows`` (indices into this dataset)."""
        out = copy.copy(self)
        out.rows, out.image_ids = self.rows[rows], self.image_ids[rows]
        return out

    @property
    def n_voxels(self) -> int:
        return int(self.betas.shape[1])

    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each target as stored (captions: (K, D))."""
        return {t: tuple(self.clip[t].shape[1:]) for t in self.targets}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, index: Sequence[int]) -> dict[str, Any]:
        index = np.asarray(index, dtype=np.int64)
        ids = self.image_ids[index]
        return {
            "x": torch.from_numpy(take_rows(self.betas, self.rows[index]).astype(np.float32, copy=False)),
            "image_id": torch.from_numpy(ids),
            "targets": {t: torch.from_numpy(take_rows(self.clip[t], ids).astype(np.float32)) for t in self.targets},
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.__getitems__([i])
        return {
            "x": batch["x"][0],
            "image_id": batch["image_id"][0],
            "targets": {k: v[0] for k, v in batch["targets"].items()},
        }


def as_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """DataLoader collate function for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def batch_loader(
    data: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0, drop_last: bool = False
) -> DataLoader:
    """Batches of ``data``; with ``shuffle`` the order depends on ``seed`` only (resumable runs)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=as_batch,
        num_workers=num_workers,
        drop_last=drop_last,
    )


def split_by_image(image_ids: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation): a random ``fraction`` of the distinct images, with every row
    of an image on the same side, so repeats of a validation image never leak into training."""
    if not 0 <= fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), not {fraction}")
    images = np.unique(image_ids)
    n_val = int(round(fraction * len(images)))
    if fraction and n_val < 2:
        raise UserError(f"val_fraction {fraction} leaves {n_val} validation images of {len(images)}; raise it or use 0")
    val_images = np.random.default_rng(seed).choice(images, n_val, replace=False)
    is_val = np.isin(image_ids, val_images)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def target_statistics(
    data: CacheDataset, names: Sequence[str], batch_size: int = 256
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-element mean and std (float64 sums, one pass) of each target over the dataset's images.

    Captions are first reduced to each image's mean caption; images without captions are skipped.
    A floor of 1e-3 x the mean std keeps constant elements from blowing up after standardising.
    """
    sums: dict[str, list] = {}
    for batch in batch_loader(data, batch_size):
        for name in names:
            rows = batch["targets"][name].double()
            if name == CAPTIONS:
                rows, has = caption_mean(rows)
                rows = rows[has]
            if not torch.isfinite(rows).all():
                raise UserError(f"CLIP cache target {name} has NaN/inf values; rebuild it with extract-clip")
            acc = sums.setdefault(name, [0, 0.0, 0.0])
            acc[0] += len(rows)
            acc[1] = acc[1] + rows.sum(0)
            acc[2] = acc[2] + (rows**2).sum(0)
    out = {}
    for name in names:
        n, s, ss = sums.get(name, [0, 0.0, 0.0])
        if n < 2:
            raise UserError(f"target {name}: fewer than 2 training images have values")
        mean = s / n
        std = ((ss / n - mean**2).clamp_min(0)).sqrt()
        std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
        out[name] = (mean.float(), std.float())
    return out
