"""The trained adapters by name: build one sized for its data, save, reload and predict.

Methods: ``mclip`` (:mod:`.adapters.mclip`), ``litemind`` (:mod:`.adapters.litemind`) and
``perception`` (:mod:`.adapters.perception`, video frames); their parameters are the fields of
``MCLIPConfig`` / ``LiteMindConfig`` / ``PerceptionConfig``. A saved adapter is
``adapter.safetensors`` (weights and buffers) plus ``adapter.json`` (everything needed to rebuild it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import UserError
from .adapters.base import Adapter, make_config, prediction_shape
from .adapters.litemind import LiteMind
from .adapters.mclip import BrainMCLIP
from .adapters.perception import Perception
from .data import CacheDataset, target_statistics
from .train import resolve_device

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



# ---- prediction, saving, loading --------------------------------------------------------------------
@torch.no_grad()
def predict(model: Adapter, betas: Any, batch_size: int = 256, device: str | None = None) -> dict[str, np.ndarray]:
    """(n, V) betas -> {target name: (n, ...) float32 prediction in the CLIP cache's units}.

    Captions (``text_embeds``) are predicted as one (D,) vector per row: the mean caption embedding.
    """
    x_all = np.asarray(betas[...] if not isinstance(betas, np.ndarray) else betas)
    if x_all.ndim != 2 or x_all.shape[1] != model.n_voxels:
        raise UserError(f"betas of shape {x_all.shape} do not fit this adapter, which expects (n, {model.n_voxels})")
    if not np.isfinite(x_all).all():
        bad = np.unique(np.nonzero(~np.isfinite(x_all))[1])
        raise UserError(f"betas have NaN/inf in {len(bad)} voxels (first: {bad[:5].tolist()})")
    if device is not None:
        model.to(resolve_device(device))
    dev = next(model.parameters()).device
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(x_all), batch_size):
        x = torch.from_numpy(x_all[start : start + batch_size].astype(np.float32)).to(dev)
        for name, pred in model.predict_batch(x).items():
            parts.setdefault(name, []).append(pred.cpu().numpy())
    empty = {n: np.zeros((0, *prediction_shape(n, s)), np.float32) for n, s in model.target_shapes.items()}
    return {n: np.concatenate(parts[n]) if n in parts else empty[n] for n in model.target_shapes}


def save_adapter(directory: Path | str, model: Adapter, extra: Mapping[str, Any] | None = None) -> Path:
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
        tmp = directory / f"{name}.tmp-{os.getpid()}"
        write(tmp)
        os.replace(tmp, directory / name)
    return directory


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def load_adapter(directory: Path | str, device: str = "cpu") -> Adapter:
    """The adapter saved by :func:`save_adapter`, in eval mode on ``device``."""
    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise UserError(f"saved adapter incomplete: {path} not found")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{spec_path} is not valid JSON ({exc})") from None
    if spec.get("format") != FORMAT:
        raise UserError(
            f"{spec_path}: not a saved adapter of this format (format={spec.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        model = _adapter_class(spec.get("method")).from_spec(spec)
    except KeyError as exc:
        raise UserError(f"{spec_path}: missing key {exc}; was it written by save_adapter?") from None
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as exc:
        raise UserError(f"{weights_path} does not fit {spec_path}: {str(exc).splitlines()[0]}") from None
    return model.to(resolve_device(device)).eval()
