"""Several subjects, one model: a subject-specific input layer in front of a shared trunk.

MindEye2 (github MedARC-AI/MindEyeV2, ``src/Train.ipynb``): subject s has its own
``Linear(n_voxels_s -> hidden)`` ("ridge", ``hidden_dim=1024`` in the released notebook, 4096 in
the paper); everything after it is shared; batches hold rows of every subject; a new subject gets a
fresh ridge layer and the whole model is fine-tuned on its first session (``--multisubject_ckpt``).
Here the trunk is one of this project's single-subject adapters (``mclip``, ``litemind``), unchanged,
built over a shared vector of "virtual voxels" that every subject's input layer writes:

- ``align="voxels"`` (MindEye2): one linear map per trunk input group (mclip: the detail and the
  semantic voxels; litemind: its input voxels) from the subject's voxels of that group to ``width``
  shared values. MindEye2 has one group (all nsdgeneral voxels); keeping mclip's two ROI groups is
  what lets its semantic encoder stay on the floc-* voxels.
- ``align="roi"`` (in the spirit of Wills Aligner's anatomical alignment, arXiv 2404.13282): NSD
  names the same ROI labels in every subject, so each label of each file in ``roi_files`` (and
  ``rest``, the nsdgeneral voxels in none of them) is one token of ``roi_width`` values, reached from
  that subject's voxels of that label by a subject-specific linear map; every subject feeds the
  trunk the same tokens in the same order, and a trunk group reads the tokens of its ROI files (a
  group of every voxel reads all of them). Wills Aligner aligns to a template brain anatomically;
  labels are the alignment NSD ships for every subject.

Missing ROIs (PmcmFL's missing-modality idea: a learned stand-in for an absent modality, and
training with modalities dropped at random): a unit (token or group) that a subject has no voxels
for (an ROI file or label absent from its store) reads a learned ``missing`` vector shared by all
subjects; with ``roi_dropout`` p > 0, training replaces each ROI group of each row (one ROI file's
tokens in roi mode, one trunk group in voxels mode) by its missing vectors with probability p. At
prediction, dropped voxels are zeroed (z-scored betas: their mean) and a unit left without voxels
reads its missing vector (``evaluate --drop-rois``).

Brain experts (``experts`` K > 0; Wills Aligner's mixture of brain experts, as issue 11 specifies
it: its paper's experts sit inside the backbone, here after it): K small residual MLPs on the
trunk's embedding (mclip: b_D and b_S; litemind: the backbone's patch features), mixed per row by
``softmax(gate[subject])`` (a learned K-vector per subject). Their last layer starts at zero, so
before the second stage (experts and gates trained, everything else frozen) they change nothing.

Subjects are keyed ``subjNN`` (the store's NSD subject number); batches carry ``subject`` (B,) NSD
numbers and ``x`` (B, max V) betas, zero-padded after each subject's own voxel count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from .base import FLOC, Adapter, make_config, module_key

ALIGNS = ("voxels", "roi")
REST = "rest"


def subject_key(subject: int) -> str:
    return f"subj{int(subject):02d}"


@dataclass
class SubjectConfig:
    """How subjects enter the shared trunk (see the module docstring)."""

    align: str = "voxels"
    width: int = 1024  # voxels: shared values per trunk group (MindEye2's released hidden_dim)
    roi_width: int = 64  # roi: values per ROI token
    roi_files: tuple[str, ...] = ("prf-visualrois", *FLOC)
    roi_dropout: float = 0.0  # training: probability of replacing one ROI group of a row by missing tokens
    experts: int = 0  # K brain experts after the trunk (0: none)
    expert_hidden: int = 64
    expert_epochs: int = 10  # the second stage: experts and gates only
    lora_rank: int = 8  # fine-tuning with --finetune lora | skip-lora

    def __post_init__(self) -> None:
        self.roi_files = tuple(self.roi_files)
        if self.align not in ALIGNS:
            raise UserError(f"--align must be one of {', '.join(ALIGNS)}, not {self.align!r}")
        for name in ("width", "roi_width", "expert_hidden", "expert_epochs", "lora_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"subjects {name} must be an integer >= 1, not {getattr(self, name)!r}")
        if not isinstance(self.experts, int) or self.experts < 0:
            raise UserError(f"--experts must be an integer >= 0, not {self.experts!r}")
        if not 0 <= self.roi_dropout < 1:
            raise UserError(f"subjects roi_dropout must be in [0, 1), not {self.roi_dropout!r}")


# ---- units: what the shared vector is made of ---------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One slice of the shared vector: ``width`` values from the voxels of ``rois`` (labels > 0 of
    these files; None = every voxel) or of one ``label`` of one file; ``group`` is its ROI dropout group."""

    name: str
    width: int
    rois: tuple[str, ...] | None
    label: str | None
    group: str


def label_values(array: Any) -> dict[str, int]:
    """Label name -> value of a ``voxels/<file>`` array (its ``labels`` attribute; values as names without)."""
    table = dict(getattr(array, "attrs", {}).get("labels") or {})
    if table:
        return {str(name): int(value) for value, name in table.items() if int(value) > 0}
    values = np.unique(np.asarray(array[...]))
    return {str(int(v)): int(v) for v in values if v > 0}


def plan_units(cfg: SubjectConfig, group_rois: Mapping[str, tuple[str, ...] | None],
               stores: Sequence[Mapping[str, Any] | None]) -> list[Unit]:
    """The units of the shared vector, from the trunk's voxel groups and every subject's ROI labels."""
    if cfg.align == "voxels":
        return [Unit(g, cfg.width, tuple(r) if r else None, None, g) for g, r in group_rois.items()]
    for g, rois in group_rois.items():
        outside = [r for r in rois or () if r not in cfg.roi_files]
        if outside:
            raise UserError(f"--align roi: the trunk's {g} voxels read ROI {outside[0]!r}, which is not in "
                            f"subjects.roi_files {list(cfg.roi_files)}")
    units = []
    for file in cfg.roi_files:
        names: dict[str, int] = {}
        for voxels in stores:
            if voxels is not None and file in voxels:
                for name, value in label_values(voxels[file]).items():
                    names.setdefault(name, value)
        units += [Unit(f"{file}/{n}", cfg.roi_width, (file,), n, file) for n in sorted(names, key=names.get)]
    if not units:
        raise UserError(f"--align roi: no subject's store has labels in {list(cfg.roi_files)}")
    if any(r is None for r in group_rois.values()):
        units.append(Unit(REST, cfg.roi_width, None, None, REST))
    return units


def unit_voxels(unit: Unit, voxels: Mapping[str, Any] | None, n_voxels: int, roi_files: Sequence[str]) -> np.ndarray:
    """Indices of one subject's voxels of ``unit`` (empty when the subject lacks them)."""
    if unit.name == REST:
        labelled = [np.asarray(voxels[f][...]) > 0 for f in roi_files if voxels is not None and f in voxels]
        return np.flatnonzero(~np.any(labelled, axis=0)) if labelled else np.arange(n_voxels)
    if unit.rois is None:
        return np.arange(n_voxels)
    present = [f for f in unit.rois if voxels is not None and f in voxels]
    if not present:
        return np.zeros(0, np.int64)
    for f in present:
        if np.asarray(voxels[f][...]).shape != (n_voxels,):
            raise UserError(f"ROI labels voxels/{f} must have one entry per voxel ({n_voxels})")
    if unit.label is None:
        return np.flatnonzero(np.any([np.asarray(voxels[f][...]) > 0 for f in present], axis=0))
    value = label_values(voxels[present[0]]).get(unit.label)
    return np.zeros(0, np.int64) if value is None else np.flatnonzero(np.asarray(voxels[present[0]][...]) == value)


# ---- modules ------------------------------------------------------------------------------------------
class SubjectLayer(nn.Module):
    """One subject's input: per present unit, a Linear from the unit's voxels to its width."""

    def __init__(self, units: Sequence[Unit], n_voxels: int, sizes: Mapping[str, np.ndarray | int]):
        super().__init__()
        self.n_voxels = int(n_voxels)
        self.maps = nn.ModuleDict()
        self.sizes = {}
        for unit in units:
            idx = sizes.get(unit.name, 0)
            n = idx if isinstance(idx, int) else len(idx)
            if n == 0:
                continue
            index = torch.zeros(n, dtype=torch.long) if isinstance(idx, int) else torch.as_tensor(idx, dtype=torch.long)
            self.register_buffer(f"voxels_{module_key(unit.name)}", index)
            self.maps[module_key(unit.name)] = nn.Linear(n, unit.width)
            self.sizes[unit.name] = n

    def forward(self, x: torch.Tensor, unit: Unit, keep: torch.Tensor | None) -> torch.Tensor | None:
        """(b, V) -> (b, width) for ``unit``, or None when this subject (with ``keep``, the kept voxels) lacks it."""
        if unit.name not in self.sizes:
            return None
        idx = getattr(self, f"voxels_{module_key(unit.name)}")
        v = x[:, idx]
        if keep is not None:
            kept = keep[idx]
            if not kept.any():
                return None
            v = v * kept.to(v.dtype)
        return self.maps[module_key(unit.name)](v)


class BrainExperts(nn.Module):
    """K residual MLP experts per embedding tensor, mixed by a per-subject softmax gate."""

    def __init__(self, dims: Sequence[int], n_experts: int, hidden: int, subjects: Sequence[str]):
        super().__init__()
        self.n_experts = n_experts
        self.experts = nn.ModuleList(
            nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                          for _ in range(n_experts))
            for d in dims
        )
        for group in self.experts:
            for expert in group:
                nn.init.zeros_(expert[-1].weight)
                nn.init.zeros_(expert[-1].bias)
        self.gates = nn.ParameterDict({s: nn.Parameter(torch.zeros(n_experts)) for s in subjects})

    def add_subject(self, key: str) -> None:
        self.gates[key] = nn.Parameter(torch.zeros(self.n_experts, device=next(self.parameters()).device))

    def forward(self, features: tuple[torch.Tensor, ...], keys: Sequence[str], rows: torch.Tensor) -> tuple:
        gate = torch.stack([F.softmax(self.gates[k], 0) for k in keys])[rows]  # (B, K)
        out = []
        for f, group in zip(features, self.experts, strict=True):
            g = gate.view(len(f), *[1] * (f.dim() - 2), self.n_experts)
            out.append(f + sum(g[..., k : k + 1] * expert(f) for k, expert in enumerate(group)))
        return tuple(out)


def _as_tuple(features: Any) -> tuple[torch.Tensor, ...]:
    return tuple(features) if isinstance(features, (tuple, list)) else (features,)


class SubjectAdapter(nn.Module):
    """Subject input layers + one shared trunk :class:`~.base.Adapter` (+ optional brain experts).

    ``subjects`` maps ``subjNN`` to ``(n_voxels, {unit name: voxel indices or count})``; built by
    :func:`pipeline.fitting.models.build_subject_adapter`, reloaded by :meth:`from_spec`.
    """

    def __init__(self, trunk: Adapter, cfg: SubjectConfig, units: Sequence[Unit],
                 subjects: Mapping[str, tuple[int, Mapping[str, np.ndarray | int]]]):
        super().__init__()
        self.config, self.units, self.trunk = cfg, list(units), trunk
        self.method = trunk.method
        self.inputs = nn.ModuleDict()
        self.missing = nn.ParameterDict({module_key(u.name): nn.Parameter(torch.zeros(u.width)) for u in self.units})
        self.drop_groups = list(dict.fromkeys(u.group for u in self.units))
        self.finetune: dict[str, Any] | None = None
        for key, (n, sizes) in subjects.items():
            self.inputs[key] = SubjectLayer(self.units, n, sizes)
        if cfg.experts:
            was = trunk.training
            with torch.no_grad():
                probe = trunk.eval().embed(torch.zeros(2, trunk.n_voxels))
            trunk.train(was)
            self.experts = BrainExperts([f.shape[-1] for f in _as_tuple(probe)], cfg.experts, cfg.expert_hidden,
                                        list(subjects))

    # ---- the Adapter interface the training loop, predict and save use ------------------------------
    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.trunk.target_shapes

    @property
    def subjects(self) -> list[str]:
        return list(self.inputs)

    def scaler(self, name: str):
        return self.trunk.scaler(name)

    def n_voxels_of(self, key: str) -> int:
        return self.inputs[key].n_voxels

    def add_subject(self, key: str, n_voxels: int, sizes: Mapping[str, np.ndarray | int]) -> None:
        """A fresh input layer (and expert gate) for ``key``; an existing one is replaced."""
        device = next(self.trunk.parameters()).device
        self.inputs[key] = SubjectLayer(self.units, n_voxels, sizes).to(device)
        if getattr(self, "experts", None) is not None and key not in self.experts.gates:
            self.experts.add_subject(key)

    def shared_input(self, x: torch.Tensor, subject: torch.Tensor,
                     keep: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, max V) betas of mixed subjects -> (B, trunk.n_voxels) shared vector."""
        keys = [subject_key(s) for s in torch.unique(subject).tolist()]
        unknown = [k for k in keys if k not in self.inputs]
        if unknown:
            raise UserError(f"this model has no input layer for {unknown[0]} (has {', '.join(self.inputs)})")
        parts, order = [], []
        for k in keys:
            rows = torch.nonzero(subject == int(k[4:])).flatten()
            layer = self.inputs[k]
            xs = x[rows, : layer.n_voxels]
            cols = []
            for unit in self.units:
                out = layer(xs, unit, None if keep is None else keep.get(k))
                cols.append(self.missing[module_key(unit.name)].expand(len(rows), -1) if out is None else out)
            parts.append(torch.cat(cols, 1))
            order.append(rows)
        v = torch.cat(parts)[torch.argsort(torch.cat(order))]
        if self.training and self.config.roi_dropout:
            v = self._drop_groups(v)
        return v

    def _drop_groups(self, v: torch.Tensor) -> torch.Tensor:
        dropped = torch.rand(len(v), len(self.drop_groups), device=v.device) < self.config.roi_dropout
        cols, start = [], 0
        for unit in self.units:
            part = v[:, start : start + unit.width]
            hit = dropped[:, self.drop_groups.index(unit.group), None]
            cols.append(torch.where(hit, self.missing[module_key(unit.name)].expand_as(part), part))
            start += unit.width
        return torch.cat(cols, 1)

    def _features(self, v: torch.Tensor, subject: torch.Tensor) -> Any:
        f = self.trunk.embed(v)
        if getattr(self, "experts", None) is None:
            return f
        keys = self.experts_keys()
        rows = torch.as_tensor([keys.index(subject_key(s)) for s in subject.tolist()], device=v.device)
        out = self.experts(_as_tuple(f), keys, rows)
        return out if isinstance(f, (tuple, list)) else out[0]

    def experts_keys(self) -> list[str]:
        return list(self.experts.gates)

    def forward(self, x: torch.Tensor, subject: torch.Tensor,
                keep: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        v = self.shared_input(x, subject, keep)
        return self.trunk.predict_heads(self._features(v, subject))

    def loss(self, x: torch.Tensor, targets: Mapping[str, torch.Tensor], groups: torch.Tensor | None = None,
             subject: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if subject is None:
            raise ValueError("a multi-subject model needs the subject of every row (a MultiSubjectDataset)")
        v = self.shared_input(x, subject)
        return self.trunk.loss(v, targets, groups, features=self._features(v, subject))

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor, subject: torch.Tensor,
                      keep: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return {name: self.scaler(name).decode(z) for name, z in self(x, subject, keep).items()}

    # ---- saving -----------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "trunk": self.trunk.spec(),
            "subjects": {
                "config": dataclasses.asdict(self.config),
                "units": [dataclasses.asdict(u) for u in self.units],
                "layers": {k: {"n_voxels": layer.n_voxels, "units": dict(layer.sizes)} for k, layer in self.inputs.items()},
                "finetune": self.finetune,
            },
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], trunk_class: type[Adapter]) -> SubjectAdapter:
        from .finetune import apply_finetune

        s = spec["subjects"]
        cfg = make_config(SubjectConfig, s["config"], "subjects")
        units = [Unit(u["name"], u["width"], tuple(u["rois"]) if u["rois"] else None, u["label"], u["group"])
                 for u in s["units"]]
        layers = {k: (v["n_voxels"], {u: int(n) for u, n in v["units"].items()}) for k, v in s["layers"].items()}
        model = cls(trunk_class.from_spec(spec["trunk"]), cfg, units, layers)
        if s.get("finetune"):
            apply_finetune(model, **s["finetune"])
        return model

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def parameter_counts(self) -> dict[str, Any]:
        """Parameters of each part: every subject's input layer, the shared trunk (by part), the
        missing tokens, the experts, and the fine-tuning adapters."""
        counts: dict[str, Any] = {f"input:{k}": sum(p.numel() for p in layer.parameters()) for k, layer in self.inputs.items()}
        lora = {n: p.numel() for n, p in self.trunk.named_parameters() if "lora_" in n}
        skip = {n: p.numel() for n, p in self.trunk.named_parameters() if ".skip_" in n}
        counts["trunk"] = sum(p.numel() for p in self.trunk.parameters()) - sum(lora.values()) - sum(skip.values())
        counts["trunk_parts"] = {k: v for k, v in self.trunk.parameter_counts().items()}
        counts["missing"] = sum(p.numel() for p in self.missing.parameters())
        if getattr(self, "experts", None) is not None:
            counts["experts"] = sum(p.numel() for p in self.experts.parameters())
        if lora:
            counts["lora"] = sum(lora.values())
        if skip:
            counts["skip_lora"] = sum(skip.values())
        return counts
