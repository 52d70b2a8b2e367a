"""What every trained (torch) adapter shares: target standardisation, voxel groups, a JSON spec.

An adapter maps a row of betas ``(V,)`` (every ``nsdgeneral`` voxel, in the fMRI cache's order) to
one prediction per CLIP-cache target. Internally it predicts *standardised* targets
``z = (y - mean) / std`` (per element, statistics of the training targets), so losses see
well-scaled numbers whatever the layer; :meth:`Adapter.predict_batch` maps back to the cache's units.
The caption target ``text_embeds`` (N, K, D) is reduced to the mean of each image's present
captions, so its prediction is (D,).

The statistics and the voxel indices of each ROI group are buffers: they are saved with the weights,
and :meth:`Adapter.spec` (JSON) holds everything else needed to rebuild the module, so a saved
adapter reloads without the training code's defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ...errors import UserError
from .losses import caption_mean

CAPTIONS = "text_embeds"
"""The CLIP-cache array of caption embeddings (N, K, D); zero rows mark missing captions."""

FLOC = ("floc-bodies", "floc-faces", "floc-places", "floc-words")
"""NSD's category-selective ROIs: BrainMCLIP's high-level (semantic) areas."""


def prediction_shape(name: str, row_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of one predicted row: the cache row's shape, except (K, D) captions -> (D,).

    >>> prediction_shape("layers/6", (17, 64)), prediction_shape("text_embeds", (5, 32))
    ((17, 64), (32,))
    """
    return tuple(row_shape[1:]) if name == CAPTIONS else tuple(row_shape)


def roi_indices(voxels: Mapping[str, Any] | None, rois: Sequence[str] | None, n_voxels: int) -> np.ndarray:
    """Indices of the voxels labelled > 0 in any of ``rois`` (``voxels/<roi>`` arrays of the fMRI
    cache); ``None`` or empty means every voxel."""
    if not rois:
        return np.arange(n_voxels)
    if voxels is None:
        raise UserError(f"ROI selection {list(rois)} needs the fMRI cache's voxels/<roi> labels; none were given")
    missing = [r for r in rois if r not in voxels]
    if missing:
        raise UserError(f"fMRI cache has no ROI labels voxels/{missing[0]} (has {sorted(voxels)})")
    labels = [np.asarray(voxels[r][...]) for r in rois]
    if any(lab.shape != (n_voxels,) for lab in labels):
        raise UserError(f"ROI label arrays of {list(rois)} must have one entry per voxel ({n_voxels})")
    idx = np.flatnonzero(np.any([lab > 0 for lab in labels], axis=0))
    if len(idx) == 0:
        raise UserError(f"no voxel is labelled in ROIs {list(rois)}")
    return idx


def make_config(cls: type, values: Mapping[str, Any] | Any | None, method: str) -> Any:
    """A config dataclass from a mapping (e.g. a params.yaml section), refusing unknown keys."""
    if isinstance(values, cls):
        return values
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown {method} parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return cls(**values)


def check_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and value > 0):
            raise UserError(f"parameter {name} must be > 0, not {value!r}")


def check_weights(config: Any) -> None:
    """Every ``w_*`` loss weight must be a number >= 0."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name.startswith("w_") and not (isinstance(value, (int, float)) and value >= 0):
            raise UserError(f"loss weight {f.name} must be >= 0, not {value!r}")


class Standardizer(nn.Module):
    """Per-element mean and std of one target, as buffers (saved with the weights)."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(tuple(shape)))
        self.register_buffer("std", torch.ones(tuple(shape)))

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        return (y.float() - self.mean) / self.std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.std + self.mean


def module_key(name: str) -> str:
    """A module name for a target name: ``torch.nn.ModuleDict`` keys may hold neither ``/`` nor ``.``.

    >>> module_key("layers/11-20_mean"), module_key("layers/1.5")
    ('layers|11-20_mean', 'layers|1,5')
    """
    return name.replace("/", "|").replace(".", ",")


class Adapter(nn.Module):
    """Base class: subclasses define ``method``, ``config_class``, :meth:`group_rois`,
    :meth:`forward` (standardised predictions) and :meth:`loss`."""

    method: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(
        self,
        config: Any,
        n_voxels: int,
        targets: Mapping[str, Sequence[int]],
        voxel_groups: Mapping[str, np.ndarray | int],
    ):
        super().__init__()
        self.config = config
        self.n_voxels = int(n_voxels)
        self.target_shapes = {name: tuple(int(s) for s in shape) for name, shape in targets.items()}
        self.scalers = nn.ModuleDict(
            {module_key(n): Standardizer(prediction_shape(n, s)) for n, s in self.target_shapes.items()}
        )
        self.group_sizes = {}
        for group, idx in voxel_groups.items():
            # an int is a placeholder of that size, filled by load_state_dict (see from_spec)
            index = (
                torch.zeros(idx, dtype=torch.long) if isinstance(idx, int) else torch.as_tensor(idx, dtype=torch.long)
            )
            self.register_buffer(f"voxels_{group}", index)
            self.group_sizes[group] = len(index)

    # ---- to be defined by subclasses ---------------------------------------------------------------
    @classmethod
    def targets_for(cls, config: Any) -> list[str]:
        """The CLIP-cache arrays this configuration trains on."""
        raise NotImplementedError

    @classmethod
    def with_targets(cls, params: Mapping[str, Any], targets: Sequence[str]) -> dict[str, Any]:
        """``params`` with fit-adapters' ``--targets`` folded into this adapter's config fields."""
        raise UserError(f"--targets is not supported by {cls.method}; set its targets in params")

    @classmethod
    def group_rois(cls, config: Any) -> dict[str, tuple[str, ...] | None]:
        """The voxel groups the model reads, each as the ROI files it selects (None: every voxel)."""
        raise NotImplementedError

    @classmethod
    def voxel_groups_for(cls, config: Any, voxels: Mapping[str, Any] | None, n_voxels: int) -> dict[str, np.ndarray]:
        """The voxel indices of each of :meth:`group_rois` in one subject's store."""
        return {g: roi_indices(voxels, rois, n_voxels) for g, rois in cls.group_rois(config).items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, V) betas -> {target: (B, *prediction_shape) standardised prediction}."""
        raise NotImplementedError

    def loss(
        self, x: torch.Tensor, targets: Mapping[str, torch.Tensor], groups: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms and their sum under ``"loss"``; ``targets`` are raw cache rows."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------------
    def voxels(self, x: torch.Tensor, group: str) -> torch.Tensor:
        return x[:, getattr(self, f"voxels_{group}")]

    def scaler(self, name: str) -> Standardizer:
        return self.scalers[module_key(name)]

    def standardized_target(self, name: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw cache rows -> standardised target, and the mask of usable rows (captions only)."""
        mask = None
        if name == CAPTIONS:
            rows, mask = caption_mean(rows.float())
        return self.scaler(name).encode(rows), mask

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, V) betas -> {target: prediction in the cache's units, float32}."""
        return {name: self.scaler(name).decode(z) for name, z in self(x).items()}

    def spec(self) -> dict[str, Any]:
        """JSON-able description that rebuilds this module (weights and buffers apart)."""
        return {
            "method": self.method,
            "config": dataclasses.asdict(self.config),
            "n_voxels": self.n_voxels,
            "targets": {n: list(s) for n, s in self.target_shapes.items()},
            "voxel_groups": dict(self.group_sizes),
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Adapter:
        config = make_config(cls.config_class, spec["config"], cls.method)
        return cls(config, spec["n_voxels"], spec["targets"], {g: int(n) for g, n in spec["voxel_groups"].items()})

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per top-level part (encoders, heads, decoders, ...), for reports."""
        counts = {name: sum(p.numel() for p in child.parameters()) for name, child in self.named_children()}
        counts.update({name: p.numel() for name, p in self.named_parameters(recurse=False)})
        return {k: v for k, v in counts.items() if v}
