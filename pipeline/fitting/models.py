"""The trained adapters by name: build one sized for its data, save, reload and predict.

Methods: ``mclip`` (:mod:`.adapters.mclip`), ``litemind`` (:mod:`.adapters.litemind`) and
``perception`` (:mod:`.adapters.perception`, video frames); their parameters are the fields of
``MCLIPConfig`` / ``LiteMindConfig`` / ``PerceptionConfig``. mclip or litemind can also be the shared
trunk of a multi-subject model (:func:`build_subject_adapter`, :mod:`.adapters.subjects`). A saved
adapter is ``adapter.safetensors`` (weights and buffers) plus ``adapter.json`` (everything needed to
rebuild it, including the fine-tuning structure of a fine-tuned model).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import UserError
from ..store import atomic_file, read_json
from ..device import resolve_device
from .adapters.base import Adapter, make_config, prediction_shape
from .adapters.litemind import LiteMind
from .adapters.mclip import BrainMCLIP
from .adapters.perception import Perception
from .adapters.subjects import SubjectAdapter, SubjectConfig, plan_units, subject_key, unit_voxels
from .cohort import MultiSubjectDataset
from .data import CacheDataset, target_statistics

ADAPTERS: dict[str, type[Adapter]] = {"mclip": BrainMCLIP, "litemind": LiteMind, "perception": Perception}
WEIGHTS_FILE, SPEC_FILE = "adapter.safetensors", "adapter.json"
FORMAT = "nsd-feature-cache/torch-adapter/1"


# ---- building ---------------------------------------------------------------------------------------
def _adapter_class(method: str) -> type[Adapter]:
    if method not in ADAPTERS:
        raise UserError(f"unknown adapter method {method!r} (known: {', '.join(ADAPTERS)})")
    return ADAPTERS[method]


def adapter_targets(method: str, config: Mapping[str, Any] | Any | None = None) -> list[str]:
    """The CLIP-cache arrays a method with this configuration trains on (to open the dataset with)."""
    cls = _adapter_class(method)
    return cls.targets_for(make_config(cls.config_class, config, method))


def build_adapter(
    method: str, config: Mapping[str, Any] | Any | None, data: CacheDataset, seed: int = 0, batch_size: int = 256
) -> Adapter:
    """A fresh adapter sized for ``data``: voxel count, ROI groups from its labels, target shapes,
    and target statistics (mean/std per element over ``data``'s rows; CLIP side only)."""
    cls = _adapter_class(method)
    cfg = make_config(cls.config_class, config, method)
    needed = cls.targets_for(cfg)
    missing = [t for t in needed if t not in data.targets]
    if missing:
        raise UserError(f"{method} needs target {missing[0]!r}, which the dataset was not opened with ({data.targets})")
    shapes = data.target_shapes
    groups = cls.voxel_groups_for(cfg, data.voxels, data.n_voxels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg, data.n_voxels, {t: shapes[t] for t in needed}, groups)
    for name, (mean, std) in target_statistics(data, needed, batch_size).items():
        model.scaler(name).mean.copy_(mean)
        model.scaler(name).std.copy_(std)
    return model


def subject_units(model: SubjectAdapter, voxels: Any, n_voxels: int) -> dict[str, np.ndarray]:
    """Voxel indices of each of ``model``'s units in one subject's store (empty: the subject lacks it)."""
    return {u.name: unit_voxels(u, voxels, n_voxels, model.config.roi_files) for u in model.units}


def build_subject_adapter(
    method: str, config: Mapping[str, Any] | Any | None, subjects: Mapping[str, Any] | SubjectConfig | None,
    data: MultiSubjectDataset, seed: int = 0, batch_size: int = 256,
) -> SubjectAdapter:
    """A fresh multi-subject model: an input layer per subject of ``data``, the shared trunk of
    ``method`` over the shared vector, and target statistics over every subject's training images."""
    cls = _adapter_class(method)
    cfg = make_config(cls.config_class, config, method)
    scfg = make_config(SubjectConfig, subjects, "subjects")
    needed = cls.targets_for(cfg)
    missing = [t for t in needed if t not in data.targets]
    if missing:
        raise UserError(f"{method} needs target {missing[0]!r}, which the dataset was not opened with ({data.targets})")
    group_rois = cls.group_rois(cfg)
    units = plan_units(scfg, group_rois, [p.voxels for p in data.parts.values()])
    offsets = np.cumsum([0] + [u.width for u in units])
    span = {u.name: np.arange(offsets[i], offsets[i + 1]) for i, u in enumerate(units)}
    groups = {}
    for g, rois in group_rois.items():  # voxels: the group's own unit; roi: the tokens of its ROI files
        if scfg.align == "voxels":
            mine = [u for u in units if u.name == g]
        else:
            mine = [u for u in units if rois is None or (u.rois is not None and u.rois[0] in rois)]
        groups[g] = np.concatenate([span[u.name] for u in mine])
    layers = {}
    for s, part in data.parts.items():
        sizes = {u.name: unit_voxels(u, part.voxels, part.n_voxels, scfg.roi_files) for u in units}
        if not any(len(v) for v in sizes.values()):
            raise UserError(f"subject {s}: none of the model's ROI units has voxels in its store")
        layers[subject_key(s)] = (part.n_voxels, sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = cls(cfg, int(offsets[-1]), {t: data.target_shapes[t] for t in needed}, groups)
        model = SubjectAdapter(trunk, scfg, units, layers)
    for name, (mean, std) in target_statistics(data, needed, batch_size).items():
        model.scaler(name).mean.copy_(mean)
        model.scaler(name).std.copy_(std)
    return model


# ---- prediction, saving, loading --------------------------------------------------------------------
@torch.no_grad()
def predict(model: Adapter | SubjectAdapter, betas: Any, batch_size: int = 256, device: str | None = None,
            subject: int | None = None, keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """(n, V) betas -> {target name: (n, ...) float32 prediction in the CLIP cache's units}.

    Captions (``text_embeds``) are predicted as one (D,) vector per row: the mean caption embedding.
    A multi-subject model needs the NSD ``subject`` of the betas. ``keep`` (V,) bool: voxels to use;
    the others are zeroed (z-scored betas: their mean), and a multi-subject model's units left
    without voxels read its learned missing tokens (scoring with ROIs removed).
    """
    x_all = np.asarray(betas[...] if not isinstance(betas, np.ndarray) else betas)
    multi = isinstance(model, SubjectAdapter)
    if multi:
        if subject is None or subject_key(subject) not in model.inputs:
            raise UserError(f"this multi-subject model predicts {', '.join(model.subjects)}, not subject {subject}")
        n_voxels = model.n_voxels_of(subject_key(subject))
    else:
        n_voxels = model.n_voxels
    if x_all.ndim != 2 or x_all.shape[1] != n_voxels:
        raise UserError(f"betas of shape {x_all.shape} do not fit this adapter, which expects (n, {n_voxels})")
    if keep is not None:
        keep = np.asarray(keep, bool)
        if keep.shape != (n_voxels,):
            raise UserError(f"keep mask of shape {keep.shape} does not fit the {n_voxels} voxels")
        if not multi:
            x_all = x_all * keep
    if not np.isfinite(x_all).all():
        bad = np.unique(np.nonzero(~np.isfinite(x_all))[1])
        raise UserError(f"betas have NaN/inf in {len(bad)} voxels (first: {bad[:5].tolist()})")
    if device is not None:
        model.to(resolve_device(device))
    dev = next(model.parameters()).device
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    kept = {subject_key(subject): torch.from_numpy(keep).to(dev)} if multi and keep is not None else None
    for start in range(0, len(x_all), batch_size):
        x = torch.from_numpy(x_all[start : start + batch_size].astype(np.float32)).to(dev)
        if multi:
            out = model.predict_batch(x, torch.full((len(x),), int(subject), dtype=torch.long, device=dev), kept)
        else:
            out = model.predict_batch(x)
        for name, pred in out.items():
            parts.setdefault(name, []).append(pred.cpu().numpy())
    empty = {n: np.zeros((0, *prediction_shape(n, s)), np.float32) for n, s in model.target_shapes.items()}
    return {n: np.concatenate(parts[n]) if n in parts else empty[n] for n in model.target_shapes}


def save_adapter(directory: Path | str, model: Adapter | SubjectAdapter, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``adapter.safetensors`` (weights and buffers) and ``adapter.json`` (everything needed to
    rebuild the module, plus ``extra``, e.g. the training history). The JSON is written last, so a
    folder with a JSON is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = {
        "format": FORMAT,
        **model.spec(),
        "n_params": model.n_params,
        "parameter_counts": model.parameter_counts(),
        "package_version": __version__,
        "extra": dict(extra or {}),
    }
    for name, write in (
        (
            WEIGHTS_FILE,
            lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(p)),
        ),
        (SPEC_FILE, lambda p: p.write_text(json.dumps(spec, indent=2, default=_jsonable))),
    ):
        with atomic_file(directory / name) as tmp:
            write(tmp)
    return directory


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def load_adapter(directory: Path | str, device: str = "cpu") -> Adapter | SubjectAdapter:
    """The adapter saved by :func:`save_adapter`, in eval mode on ``device``."""
    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise UserError(f"saved adapter incomplete: {path} not found")
    spec = read_json(spec_path)
    if spec.get("format") != FORMAT:
        raise UserError(
            f"{spec_path}: not a saved adapter of this format (format={spec.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        cls = _adapter_class(spec.get("method"))
        model = SubjectAdapter.from_spec(spec, cls) if "subjects" in spec else cls.from_spec(spec)
    except KeyError as exc:
        raise UserError(f"{spec_path}: missing key {exc}; was it written by save_adapter?") from None
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as exc:
        raise UserError(f"{weights_path} does not fit {spec_path}: {str(exc).splitlines()[0]}") from None
    return model.to(resolve_device(device)).eval()
