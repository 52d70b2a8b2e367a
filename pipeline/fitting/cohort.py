"""Several subjects' training rows as one dataset: :class:`CacheDataset` parts sharing one
:class:`TargetBank` (the CLIP-cache rows of every image any subject saw, each image once).

Batches are ``{"x": (B, max V) float32, zero-padded after each subject's voxels, "subject": (B,)
int64 NSD subject numbers, "image_id", "targets"}``; the rows of all subjects are shuffled together,
so batches mix subjects in proportion to their rows (MindEye2 instead fills each batch with
``batch_size / n_subjects`` rows of every subject; with equal-sized subjects the two agree on average).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from .data import CacheDataset, TargetBank, arrays_sha256, block_order


class MultiSubjectDataset(Dataset):
    """The concatenated rows of ``parts`` ({NSD subject number: dataset}); every part must use ``bank``."""

    def __init__(self, parts: Mapping[int, CacheDataset], bank: TargetBank):
        if not parts:
            raise ValueError("a multi-subject dataset needs at least one subject")
        if any(p.bank is not bank for p in parts.values()):
            raise ValueError("every subject's dataset must share one target bank (bank=)")
        self.parts = dict(parts)
        self.bank = bank
        self.targets = list(bank.targets)
        subjects = list(self.parts)
        self.subject = np.concatenate([np.full(len(p), s, np.int64) for s, p in self.parts.items()])
        self.local = np.concatenate([np.arange(len(p)) for p in self.parts.values()])
        self.image_ids = np.concatenate([p.image_ids for p in self.parts.values()])
        self.bank_rows = np.concatenate([p.bank_rows for p in self.parts.values()])
        self.max_voxels = max(p.n_voxels for p in self.parts.values())
        self._index = {s: i for i, s in enumerate(subjects)}

    @classmethod
    def from_stores(cls, fmri: Mapping[int, zarr.Group | Mapping[str, Any]], clip: Mapping[str, Any] | zarr.Group,
                    targets: Sequence[str], split: str = "train", memory: int | None = None,
                    progress: bool = False) -> MultiSubjectDataset:
        """One split of several fMRI caches ({subject: store}) against one CLIP cache."""
        ids = np.concatenate([np.asarray(g[f"{split}/image_ids"][...]) for g in fmri.values()])
        bank = TargetBank(clip, list(dict.fromkeys(targets)), ids, memory, progress)
        parts = {s: CacheDataset.from_stores(g, clip, targets, split, bank=bank) for s, g in fmri.items()}
        return cls(parts, bank)

    def subset(self, rows: np.ndarray) -> MultiSubjectDataset:
        out = copy.copy(self)
        for name in ("subject", "local", "image_ids", "bank_rows"):
            setattr(out, name, getattr(self, name)[rows])
        return out

    def to(self, device: torch.device) -> MultiSubjectDataset:
        out = copy.copy(self)
        out.bank = self.bank.to(device)
        out.parts = {s: copy.copy(p) for s, p in self.parts.items()}
        for p in out.parts.values():
            p.betas, p.bank = p.betas.to(device), out.bank
        return out

    @property
    def nbytes_in_memory(self) -> int:
        return sum(int(p.betas.nbytes) for p in self.parts.values()) + self.bank.nbytes_in_memory

    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.bank.shapes)

    def rows_of(self, subject: int) -> np.ndarray:
        return np.flatnonzero(self.subject == subject)

    def fingerprint(self) -> dict[str, Any]:
        parts = {str(s): p.fingerprint()["betas"] for s, p in self.parts.items()}
        return {"betas": parts, "rows": arrays_sha256(self.subject, self.local, self.image_ids),
                "targets": self.bank.fingerprint()}

    def order(self, seed: int | None) -> np.ndarray:
        return block_order(self.bank, self.bank_rows, seed)

    def __len__(self) -> int:
        return len(self.subject)

    def __getitems__(self, index: Sequence[int]) -> dict[str, Any]:
        index = np.asarray(index, dtype=np.int64)
        first = next(iter(self.parts.values())).betas
        x = torch.zeros((len(index), self.max_voxels), dtype=first.dtype, device=first.device)
        subject = self.subject[index]
        for s in np.unique(subject):
            at = np.flatnonzero(subject == s)
            part = self.parts[int(s)]
            rows = torch.as_tensor(part.rows[self.local[index[at]]], device=part.betas.device)
            x[torch.as_tensor(at, device=x.device), : part.n_voxels] = part.betas[rows]
        return {
            "x": x,
            "subject": torch.from_numpy(subject),
            "image_id": torch.from_numpy(self.image_ids[index]),
            "targets": self.bank.gather(self.bank_rows[index]),
        }
