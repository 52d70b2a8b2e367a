"""Stage 2's training data: fMRI rows paired with CLIP-cache target rows, read once.

No CLIP runs here: targets are rows of the CLIP cache, indexed by the fMRI cache's image ids.

Reading a shuffled batch straight from the stores decodes a whole chunk per row it touches (at NSD
layout a 64-row batch decodes ~1.3 GB: 266-row beta chunks, 1024-row embedding chunks), so the data
is read once instead:

- the betas of the rows (n, V) float32 are loaded into memory when the dataset is built;
- a :class:`TargetBank` holds the target rows of every image the rows show (each image once, in the
  cache's dtype): in memory while they fit the ``memory`` budget (smallest targets first), the
  others (token layers of many images) streamed in blocks of whole chunks, at most a few blocks held
  at a time, the next one read in the background;
- :meth:`CacheDataset.order` shuffles rows fully when everything is in memory and, when a target is
  streamed, shuffles blocks and the rows within each block, so every block is decoded once per epoch.

A bank is keyed by 0-based image id, so several datasets can share one (``bank=``): the rows of
several subjects index the same 73k-row store.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import UserError
from ..memory import available_memory, cgroup_room
from ..store import ReadStats, human_bytes, row_bytes, take_rows
from .adapters.base import CAPTIONS
from .adapters.losses import caption_mean
from .pairs import row_key

MEMORY_FRACTION = 0.5
"""Default target budget: this fraction of the memory available when the bank is built."""
BLOCK_BYTES = 256 << 20
"""Decoded bytes of one block of streamed targets (whole chunks; at least one chunk)."""
HELD_BLOCKS = 3
"""Streamed blocks held at once: the current one, the one a batch may straddle into, the prefetched one."""


def _array_names(store: Mapping[str, Any] | zarr.Group) -> list[str]:
    if isinstance(store, zarr.Group):
        return sorted(name for name, node in store.members(max_depth=None) if isinstance(node, zarr.Array))
    return sorted(store)


def chunk_rows(array: Any) -> int:
    """Rows per stored chunk (1 for in-memory arrays: reading a row costs that row only)."""
    chunks = getattr(array, "chunks", None)
    return int(chunks[0]) if isinstance(array, zarr.Array) and chunks else 1


def memory_budget(memory: int | None) -> int:
    """Bytes of targets to hold in memory: ``memory`` as configured (refused, in one line, when it
    exceeds what this process's cgroup leaves), else :data:`MEMORY_FRACTION` of what it may allocate."""
    if memory is None:
        return int(MEMORY_FRACTION * available_memory())
    room = cgroup_room()
    if room is not None and memory > room[1]:
        raise UserError(f"train.memory_gb = {memory / 1e9:.1f} GB exceeds the {room[1] / 1e9:.1f} GB left under this "
                        f"process's cgroup memory limit ({room[0] / 1e9:.1f} GB); lower it or leave it null")
    return int(memory)


def arrays_sha256(*arrays: np.ndarray) -> str:
    """SHA-256 of the arrays' dtypes, shapes and bytes: a fingerprint of what a dataset holds."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class TargetBank:
    """The CLIP-cache rows of a set of images, by 0-based image id (see the module docstring).

    ``clip`` maps target names (``layers/<name>``, ``image_embeds``, ``text_embeds``) to (N, ...)
    arrays (a zarr group or a mapping of numpy/zarr arrays). ``memory``: bytes of targets to hold
    in memory (default :data:`MEMORY_FRACTION` of the available memory, cgroup limits included:
    :func:`memory_budget`), in the cache's dtype (uint8 frames stay uint8 until their batch is
    gathered as float32). ``reads`` counts the bytes decoded from the store so far (loading and
    streaming) and the bytes of the rows they served (:class:`~pipeline.store.ReadStats`).
    """

    def __init__(
        self,
        clip: Mapping[str, Any] | zarr.Group,
        targets: Sequence[str],
        image_ids: np.ndarray,
        memory: int | None = None,
        progress: bool = False,
    ):
        self.clip, self.targets = clip, list(targets)
        self.images = np.unique(np.asarray(image_ids, dtype=np.int64))
        arrays = {t: clip[t] for t in self.targets}
        self.shapes = {t: tuple(int(s) for s in a.shape[1:]) for t, a in arrays.items()}
        budget = memory_budget(memory)
        self.tables: dict[str, torch.Tensor] = {}
        self.streamed: dict[str, Any] = {}
        for name in sorted(self.targets, key=lambda t: row_bytes(arrays[t])):
            size = len(self.images) * row_bytes(arrays[name])
            if size <= budget:
                budget -= size
                self.tables[name] = torch.empty((len(self.images), *self.shapes[name]),
                                                dtype=_torch_dtype(arrays[name].dtype))
            else:
                self.streamed[name] = arrays[name]
        self.reads = ReadStats()
        self.block_of_image = self._blocks()
        self._block_start = np.searchsorted(self.block_of_image, np.arange(self.n_blocks))
        self._held: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._fingerprint: dict[str, Any] | None = None
        self._load(progress)

    def _blocks(self) -> np.ndarray:
        """Block index of each image: consecutive whole chunks of the streamed arrays, about
        :data:`BLOCK_BYTES` decoded each (in memory only: one block per :data:`BLOCK_BYTES` loaded)."""
        arrays = list(self.streamed.values()) or [self.clip[t] for t in self.tables]
        unit = max(chunk_rows(a) for a in arrays)
        chunk = self.images // unit
        per_chunk = sum(unit * row_bytes(a) for a in arrays)
        starts = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1]])  # first image of each touched chunk
        block_of_chunk = np.arange(len(starts)) // max(1, BLOCK_BYTES // max(per_chunk, 1))
        return np.repeat(block_of_chunk, np.diff(np.r_[starts, len(self.images)]))

    def _load(self, progress: bool) -> None:
        if not self.tables:
            return
        blocks = np.unique(self.block_of_image)
        total = sum(int(t.nbytes) for t in self.tables.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading targets", disable=not progress) as bar:
            for b in blocks:
                where = np.flatnonzero(self.block_of_image == b)
                for name, table in self.tables.items():
                    array = self.clip[name]
                    rows = take_rows(array, self.images[where], self.reads)
                    table[where[0] : where[-1] + 1] = torch.from_numpy(np.asarray(rows))
                    bar.update(len(where) * row_bytes(array))

    @property
    def decoded(self) -> int:
        """Bytes decoded from the store so far (measured by :func:`~pipeline.store.take_rows`)."""
        return self.reads.decoded

    @property
    def n_blocks(self) -> int:
        return int(self.block_of_image[-1]) + 1 if len(self.block_of_image) else 0

    # ---- reading ----------------------------------------------------------------------------------
    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Bank rows of 0-based image ids (all must be in the bank)."""
        rows = np.searchsorted(self.images, image_ids)
        if len(image_ids) and (rows.max() >= len(self.images) or (self.images[rows] != image_ids).any()):
            raise ValueError("image ids outside the target bank; build it with every image the rows show")
        return rows

    def gather(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """{target: (len(rows), ...) float32} for bank rows ``rows``, in that order."""
        out = {}
        for name, table in self.tables.items():
            out[name] = table[torch.as_tensor(rows, device=table.device)].float()
        if self.streamed:
            blocks = self.block_of_image[rows]
            parts = {name: torch.empty((len(rows), *self.shapes[name])) for name in self.streamed}
            _, first = np.unique(blocks, return_index=True)
            for b in blocks[np.sort(first)]:  # in the pass's order: the batch's last block stays held for the next
                held = self._block(int(b))
                at = np.flatnonzero(blocks == b)
                local = torch.as_tensor(rows[at] - self._block_start[b])
                for name in self.streamed:
                    parts[name][torch.as_tensor(at)] = held[name][local].float()
            out.update(parts)
        return {t: out[t] for t in self.targets}

    def prefetch(self, block: int) -> None:
        """Start reading a streamed block in the background (no-op when nothing is streamed)."""
        if self.streamed and block not in self._held and block not in self._pending:
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="target-blocks")
            self._pending[block] = self._pool.submit(self._read_block, block)

    def _read_block(self, block: int) -> dict[str, torch.Tensor]:
        ids = self.images[self.block_of_image == block]
        out = {}
        for name, array in self.streamed.items():
            out[name] = torch.from_numpy(np.asarray(take_rows(array, ids, self.reads)))
        return out

    def _block(self, block: int) -> dict[str, torch.Tensor]:
        if block in self._held:
            self._held.move_to_end(block)
            return self._held[block]
        pending = self._pending.pop(block, None)
        held = pending.result() if pending is not None else self._read_block(block)
        self._held[block] = held
        while len(self._held) > HELD_BLOCKS:
            self._held.popitem(last=False)
        return held

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def nbytes_in_memory(self) -> int:
        return sum(int(t.nbytes) for t in self.tables.values())

    def to(self, device: torch.device) -> TargetBank:
        """A bank whose in-memory tables live on ``device`` (streamed blocks stay on the host)."""
        out = copy.copy(self)
        out.tables = {k: v.to(device) for k, v in self.tables.items()}
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the targets: a hash of each in-memory table; for streamed ones the store's
        settings and the array's metadata (reading them whole would defeat streaming)."""
        if self._fingerprint is None:
            settings = self.clip.attrs.get("settings") if isinstance(self.clip, zarr.Group) else None
            out: dict[str, Any] = {"images": arrays_sha256(self.images), "streamed": sorted(self.streamed)}
            for name in self.targets:
                if name in self.tables:
                    out[name] = arrays_sha256(self.tables[name].cpu().numpy())
                else:
                    meta = self.streamed[name].metadata.to_dict() if isinstance(self.streamed[name], zarr.Array) else {}
                    out[name] = arrays_sha256(np.frombuffer(json.dumps([settings, meta], sort_keys=True, default=str).encode(), np.uint8))
            self._fingerprint = out
        return self._fingerprint

    def describe(self) -> str:
        mem = ", ".join(self.tables) or "none"
        return (f"{len(self.images)} images; in memory: {mem} ({human_bytes(self.nbytes_in_memory)})"
                + (f"; streamed in {self.n_blocks} blocks: {', '.join(self.streamed)}" if self.streamed else ""))


def _torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype a target table is held in: the cache's own (so the budget counts what is held)."""
    return {np.dtype("float16"): torch.float16, np.dtype("float64"): torch.float64,
            np.dtype("uint8"): torch.uint8}.get(np.dtype(dtype), torch.float32)


class CacheDataset(Dataset):
    """fMRI rows paired with CLIP-cache target rows, read once (see the module docstring).

    ``betas`` (n, V) and ``image_ids`` (n,) (0-based ids = CLIP-store rows) may be numpy or zarr
    arrays; ``clip`` is a zarr group or any mapping from target names (``layers/<name>``,
    ``image_embeds``, ``text_embeds``) to (N, ...) arrays. ``voxels`` maps ROI names to per-voxel
    labels (the fMRI cache's ``voxels/`` group), needed by ROI-split models. ``memory``: bytes of
    targets held in memory (see :class:`TargetBank`); ``bank``: share an existing bank instead.
    Batches (:func:`iter_batches`, or ``__getitems__``) are ``{"x": (B, V) float32, "image_id":
    (B,) int64, "targets": {name: (B, ...) float32}}``.
    """

    def __init__(
        self,
        betas: Any,
        image_ids: Any,
        clip: Mapping[str, Any] | zarr.Group,
        targets: Sequence[str],
        voxels: Mapping[str, Any] | None = None,
        name: str = "fMRI cache",
        *,
        memory: int | None = None,
        bank: TargetBank | None = None,
        progress: bool = False,
    ):
        self.clip, self.voxels, self.name = clip, voxels, name
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.targets = list(dict.fromkeys(targets))
        if getattr(betas, "ndim", None) != 2:
            raise UserError(f"{name}: betas must be a 2-D (rows, voxels) array, not of shape {tuple(betas.shape)}")
        betas = np.ascontiguousarray(np.asarray(betas[...]), dtype=np.float32)  # read once
        self._check(betas)
        self.betas = torch.from_numpy(betas)
        self.rows = np.arange(len(self.image_ids))
        self.bank = bank if bank is not None else TargetBank(clip, self.targets, self.image_ids, memory, progress)
        self.bank_rows = self.bank.rows_of(self.image_ids)

    @classmethod
    def from_stores(
        cls,
        fmri: Mapping[str, Any] | zarr.Group,
        clip: Mapping[str, Any] | zarr.Group,
        targets: Sequence[str],
        split: str = "train",
        **kwargs: Any,
    ) -> CacheDataset:
        """A split (``train`` or ``test``) of an fMRI cache, with ROI labels from its ``voxels/``
        group; ``fmri`` is the zarr group or a flat mapping with the same keys (``train/betas``...).
        ``kwargs`` go to the constructor (``memory``, ``bank``, ``progress``)."""
        if f"{split}/betas" not in fmri:
            raise UserError(f"fMRI cache has no {split}/betas; is it a store made by prepare-fmri?")
        rows = f"{split}/{row_key(fmri, split)}"
        if isinstance(fmri, zarr.Group):
            voxels = fmri["voxels"] if "voxels" in fmri else None
        else:
            voxels = {k.removeprefix("voxels/"): v for k, v in fmri.items() if k.startswith("voxels/")} or None
        return cls(
            fmri[f"{split}/betas"], fmri[rows], clip, targets, voxels, name=f"fMRI cache {split}",
            **kwargs,
        )

    def _check(self, betas: np.ndarray) -> None:
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
        if betas.shape[0] != len(self.image_ids):
            raise UserError(
                f"{self.name}: betas {tuple(betas.shape)} and image_ids ({len(self.image_ids)},) do not pair up"
            )
        if len(self.image_ids) and (self.image_ids.min() < 0 or self.image_ids.max() >= n):
            bad = self.image_ids[(self.image_ids < 0) | (self.image_ids >= n)]
            raise UserError(
                f"{self.name}: image ids {bad[:3].tolist()} are outside the CLIP cache's rows 0..{n - 1}; "
                "were the two caches made from the same stimuli?"
            )
        finite = np.isfinite(betas).all(0)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise UserError(f"{self.name}: betas have NaN/inf in {len(bad)} voxels (first: {bad[:5].tolist()})")

    def subset(self, rows: np.ndarray) -> CacheDataset:
        """The same data restricted to ``rows`` (indices into this dataset); shares betas and bank."""
        out = copy.copy(self)
        out.rows, out.image_ids, out.bank_rows = self.rows[rows], self.image_ids[rows], self.bank_rows[rows]
        return out

    def to(self, device: torch.device) -> CacheDataset:
        """The same data with the betas and in-memory targets on ``device``."""
        out = copy.copy(self)
        out.betas, out.bank = self.betas.to(device), self.bank.to(device)
        return out

    @property
    def nbytes_in_memory(self) -> int:
        return int(self.betas.nbytes) + self.bank.nbytes_in_memory

    @property
    def n_voxels(self) -> int:
        return int(self.betas.shape[1])

    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each target as stored (captions: (K, D))."""
        return dict(self.bank.shapes)

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the data for checkpoints: a hash of the betas, rows and image ids, and the bank's."""
        return {"betas": arrays_sha256(self.betas.cpu().numpy(), self.rows, self.image_ids), "targets": self.bank.fingerprint()}

    def order(self, seed: int | None) -> np.ndarray:
        return block_order(self.bank, self.bank_rows, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, index: Sequence[int]) -> dict[str, Any]:
        index = np.asarray(index, dtype=np.int64)
        rows = torch.as_tensor(self.rows[index], device=self.betas.device)
        return {
            "x": self.betas[rows],
            "image_id": torch.from_numpy(self.image_ids[index]),
            "targets": self.bank.gather(self.bank_rows[index]),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.__getitems__([i])
        return {
            "x": batch["x"][0],
            "image_id": batch["image_id"][0],
            "targets": {k: v[0] for k, v in batch["targets"].items()},
        }


def block_order(bank: TargetBank, bank_rows: np.ndarray, seed: int | None) -> np.ndarray:
    """Row order of one pass over rows showing bank rows ``bank_rows``: ``seed`` None = grouped by
    block, else shuffled (fully when every target is in memory; blocks, then rows within each
    block, when one is streamed, so every block is decoded once per pass)."""
    blocks = bank.block_of_image[bank_rows]
    if seed is None:
        return np.argsort(blocks, kind="stable") if bank.streamed else np.arange(len(bank_rows))
    rng = np.random.default_rng(seed)
    if not bank.streamed:
        return rng.permutation(len(bank_rows))
    return np.concatenate([rng.permutation(np.flatnonzero(blocks == b)) for b in rng.permutation(np.unique(blocks))])


def iter_batches(
    data: Dataset, batch_size: int, seed: int | None = None, drop_last: bool = False,
    shard: tuple[int, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches of ``data`` in :meth:`CacheDataset.order` (``seed`` None: unshuffled); any dataset
    with ``__len__`` and a batch-returning ``__getitems__`` works (shuffled by ``seed``).
    ``shard=(rank, n)``: only the rank-th of n equal contiguous slices of every batch is read
    (several training processes, :mod:`pipeline.fitting.distributed`)."""
    if hasattr(data, "order"):
        order = data.order(seed)
    else:
        order = np.arange(len(data)) if seed is None else np.random.default_rng(seed).permutation(len(data))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    bank = getattr(data, "bank", None)
    upcoming = None
    if bank is not None and bank.streamed and len(order):  # the block after each position's block
        blocks = bank.block_of_image[data.bank_rows[order]]
        new = np.r_[True, blocks[1:] != blocks[:-1]]
        upcoming = np.r_[blocks[new][1:], -1][np.cumsum(new) - 1]
    for start in range(0, stop, batch_size):
        if upcoming is not None and upcoming[start] >= 0:  # read the next block while this one trains
            bank.prefetch(int(upcoming[start]))
        rows = order[start : start + batch_size]
        if shard is not None:
            rank, n = shard
            per = len(rows) // n
            rows = rows[rank * per : (rank + 1) * per]
        yield data.__getitems__(rows)


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
    """Per-element mean and std (float64 sums, one pass) of each target over the dataset's images,
    each image once however many rows show it.

    Captions are first reduced to each image's mean caption; images without captions are skipped.
    A floor of 1e-3 x the mean std keeps constant elements from blowing up after standardising.
    """
    _, first = np.unique(data.image_ids, return_index=True)
    images = data.subset(np.sort(first))
    values = max(int(np.prod(data.target_shapes[n], dtype=np.int64)) for n in names)
    rows_per_batch = max(1, min(batch_size, (64 << 20) // (8 * values)))  # float64 batches of <= 64 MB
    sums: dict[str, list] = {}
    for batch in iter_batches(images, rows_per_batch):
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
