"""Stage 2's trained adapters: data from the caches, the training loop, saving and prediction.

No CLIP runs here: targets are rows of the CLIP cache, indexed by the fMRI cache's image ids.
Typical use (the ``fit-adapters`` stage)::

    fmri, clip = zarr.open_group(fmri_path, mode="r"), zarr.open_group(clip_path, mode="r")
    targets = adapter_targets("mclip", params)               # the cache arrays the config needs
    data = CacheDataset.from_stores(fmri, clip, targets, split="train")
    model = build_adapter("mclip", params, data, seed=0)     # shapes, ROI voxels, target statistics
    result = train(model, data, TrainConfig(epochs=50, checkpoint_dir=run / "checkpoints"))
    save_adapter(run / "adapters" / "mclip", model, extra={"train": result.as_dict()})
    model = load_adapter(run / "adapters" / "mclip")
    preds = predict(model, fmri["test/betas"][...])          # {target name: (n, ...) float32}

Methods: ``mclip`` (:mod:`pipeline.adapters.mclip`) and ``litemind``
(:mod:`pipeline.adapters.litemind`); their parameters are the fields of ``MCLIPConfig`` /
``LiteMindConfig``, training parameters those of :class:`TrainConfig`.

Training: AdamW, linear warm-up then cosine decay per step, mixed precision on CUDA (bf16 where
supported, else fp16 with loss scaling), a validation split taken from the training rows by image
(all repeats of an image on the same side), early stopping on the validation loss with the best
weights restored, a checkpoint after every epoch from which an interrupted run resumes to the same
result, and a progress bar with the running loss. With a fixed seed, CPU runs are bit-for-bit
deterministic.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import __version__
from ..errors import UserError
from ..store import take_rows
from .adapters.base import CAPTIONS, Adapter, make_config, prediction_shape
from .adapters.litemind import LiteMind
from .adapters.losses import caption_mean
from .adapters.mclip import BrainMCLIP

ADAPTERS: dict[str, type[Adapter]] = {"mclip": BrainMCLIP, "litemind": LiteMind}
WEIGHTS_FILE, SPEC_FILE = "adapter.safetensors", "adapter.json"
FORMAT = "nsd-feature-cache/torch-adapter/1"
CHECKPOINT_PARTS = ("model", "optimizer", "scheduler", "scaler")


# ---- data -----------------------------------------------------------------------------------------
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
        for key in (f"{split}/betas", f"{split}/image_ids"):
            if key not in fmri:
                raise UserError(f"fMRI cache has no {key}; is it a store made by prepare-fmri?")
        if isinstance(fmri, zarr.Group):
            voxels = fmri["voxels"] if "voxels" in fmri else None
        else:
            voxels = {k.removeprefix("voxels/"): v for k, v in fmri.items() if k.startswith("voxels/")} or None
        return cls(
            fmri[f"{split}/betas"], fmri[f"{split}/image_ids"], clip, targets, voxels, name=f"fMRI cache {split}"
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


# ---- training ---------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Training-loop parameters; defaults suit the ~1k-10k images of an NSD subject."""

    epochs: int = 50
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of all steps with a linear warm-up
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    val_fraction: float = 0.1
    patience: int | None = 10  # epochs without a better validation loss; None: never stop early
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    amp: bool = True  # mixed precision, CUDA only
    num_workers: int = 0
    checkpoint_dir: str | None = None
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"train {name} must be an integer >= 1, not {getattr(self, name)!r}")
        if not self.lr > 0:
            raise UserError(f"train lr must be > 0, not {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise UserError(f"train warmup must be a fraction in [0, 1), not {self.warmup!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint it resumes."""
        skip = {"device", "num_workers", "checkpoint_dir", "resume", "progress"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # one entry per epoch: train/val loss, terms, lr, seconds
    best_epoch: int  # 1-based epoch whose weights the model now holds
    best_val_loss: float | None
    epochs_run: int
    stopped_early: bool
    resumed_from: int | None  # epochs already done in the checkpoint this run resumed
    n_params: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(device)


def warmup_cosine(total: int, warmup: int, min_ratio: float):
    """Learning-rate factor per step: linear 0->1 over ``warmup`` steps, cosine 1->min_ratio after."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _autocast(device: torch.device, enabled: bool) -> tuple[torch.autocast, torch.amp.GradScaler]:
    use = enabled and device.type == "cuda"
    dtype = torch.bfloat16 if use and torch.cuda.is_bf16_supported() else torch.float16
    return (
        torch.autocast(device.type, dtype=dtype, enabled=use),
        torch.amp.GradScaler(device.type, enabled=use and dtype == torch.float16),
    )


def _to(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    nb = device.type == "cuda"
    targets = {k: v.to(device, non_blocking=nb) for k, v in batch["targets"].items()}
    return batch["x"].to(device, non_blocking=nb), targets, batch["image_id"].to(device, non_blocking=nb)


@torch.no_grad()
def evaluate_loss(
    model: Adapter, data: Dataset, batch_size: int, device: torch.device, amp: bool = True
) -> dict[str, float]:
    """Row-weighted mean of each loss term over ``data``, in eval mode."""
    model.eval()
    totals: dict[str, float] = {}
    n = 0
    autocast, _ = _autocast(device, amp)
    for batch in batch_loader(data, batch_size):
        x, targets, ids = _to(batch, device)
        with autocast:
            terms = model.loss(x, targets, ids)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(x)
        n += len(x)
    return {k: v / max(n, 1) for k, v in totals.items()}


def _fingerprint(model: Adapter, cfg: TrainConfig, n_train: int) -> str:
    return json.dumps({"model": model.spec(), "train": cfg.fingerprint(), "n_train": n_train}, sort_keys=True)


def train(
    model: Adapter, data: Dataset, config: TrainConfig | Mapping[str, Any] | None = None, val: Dataset | None = None
) -> TrainResult:
    """Fit ``model`` on ``data``; validation rows come from ``val`` or are split off ``data`` by image.

    ``data`` is a :class:`CacheDataset` or any dataset whose ``__getitems__`` returns its batch
    layout (the split needs its ``image_ids`` and ``subset``; pass ``val`` or ``val_fraction=0``
    otherwise).

    The model ends on the device it trained on, holding the weights of the best validation epoch
    (the last epoch when there is no validation set).
    """
    cfg = make_config(TrainConfig, config, "train")
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    train_set = data
    if val is None and cfg.val_fraction:
        rows, val_rows = split_by_image(data.image_ids, cfg.val_fraction, cfg.seed)
        train_set, val = data.subset(rows), data.subset(val_rows)
    if len(train_set) < 2:
        raise UserError(f"training needs at least 2 rows, got {len(train_set)}")
    drop_last = len(train_set) > cfg.batch_size  # a last batch of 1 row has no contrastive signal
    steps = len(train_set) // cfg.batch_size if drop_last else 1

    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, int(cfg.warmup * total), cfg.min_lr_ratio)
    )
    autocast, scaler = _autocast(device, cfg.amp)

    state = {
        "epoch": 0,
        "history": [],
        "best_val": math.inf,
        "best_epoch": 0,
        "best_state": None,
        "bad": 0,
        "done": False,
    }
    fingerprint = _fingerprint(model, cfg, len(train_set))
    ckpt = Path(cfg.checkpoint_dir) / "last.pt" if cfg.checkpoint_dir else None
    parts = (model, optimizer, scheduler, scaler)
    resumed_from = None
    cuda_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=cuda_ids):  # the caller's RNG stays put
        torch.manual_seed(cfg.seed)
        if ckpt is not None and cfg.resume and ckpt.exists():
            resumed_from = _load_checkpoint(ckpt, parts, state, fingerprint, device)
        with tqdm(
            total=total,
            initial=state["epoch"] * steps,
            desc=f"train {model.method}",
            unit="step",
            disable=not cfg.progress,
        ) as bar:
            while not state["done"] and state["epoch"] < cfg.epochs:
                epoch = state["epoch"] + 1
                t0 = time.perf_counter()
                loader = batch_loader(
                    train_set, cfg.batch_size, True, cfg.seed * 100_003 + epoch, cfg.num_workers, drop_last
                )
                record = {"epoch": epoch, **_train_epoch(parts, loader, autocast, device, cfg.grad_clip, bar, epoch)}
                record["lr"] = optimizer.param_groups[0]["lr"]
                if val is not None and len(val):
                    record.update(
                        {f"val_{k}": v for k, v in evaluate_loss(model, val, cfg.batch_size, device, cfg.amp).items()}
                    )
                record["seconds"] = time.perf_counter() - t0
                monitored = record.get("val_loss", record["train_loss"])
                if monitored < state["best_val"] or val is None:
                    state.update(best_val=monitored, best_epoch=epoch, bad=0)
                    state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                else:
                    state["bad"] += 1
                state["history"].append(record)
                state["epoch"] = epoch
                state["done"] = cfg.patience is not None and state["bad"] >= cfg.patience
                bar.set_postfix(
                    epoch=epoch, loss=f"{record['train_loss']:.4f}", val=f"{record.get('val_loss', math.nan):.4f}"
                )
                if ckpt is not None:
                    _save_checkpoint(ckpt, parts, state, fingerprint, device)
    model.load_state_dict(state["best_state"])
    model.eval()
    return TrainResult(
        history=state["history"],
        best_epoch=state["best_epoch"],
        best_val_loss=state["best_val"] if val is not None else None,
        epochs_run=state["epoch"],
        stopped_early=state["done"],
        resumed_from=resumed_from,
        n_params=model.n_params,
        seconds=time.perf_counter() - start,
    )


def _train_epoch(
    parts: tuple,
    loader: DataLoader,
    autocast: torch.autocast,
    device: torch.device,
    grad_clip: float | None,
    bar: tqdm,
    epoch: int,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss term as ``train_<term>``."""
    model, optimizer, scheduler, scaler = parts
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        x, targets, ids = _to(batch, device)
        with autocast:
            terms = model.loss(x, targets, ids)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise UserError(f"training diverged at epoch {epoch} (loss {float(loss)}); lower lr or check the inputs")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        n += 1
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{sums['loss'] / n:.4f}")
    return {f"train_{k}": v / max(1, n) for k, v in sums.items()}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _load_checkpoint(path: Path, parts: tuple, state: dict, fingerprint: str, device: torch.device) -> int:
    """Restore a run from its checkpoint; returns the number of epochs it had done."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("fingerprint") != fingerprint:
        raise UserError(f"{path} was made with other settings or data; delete it (or set resume: false) to start over")
    for part, key in zip(parts, CHECKPOINT_PARTS, strict=True):
        part.load_state_dict(saved[key])
    torch.set_rng_state(saved["rng"]["cpu"])
    if device.type == "cuda" and len(saved["rng"]["cuda"]):
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    state.update({k: saved[k] for k in state})
    return state["epoch"]


def _save_checkpoint(path: Path, parts: tuple, state: dict, fingerprint: str, device: torch.device) -> None:
    """Everything a resumed run needs, written atomically (a kill leaves the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    saved = {key: part.state_dict() for part, key in zip(parts, CHECKPOINT_PARTS, strict=True)}
    torch.save({**state, **saved, "rng": _rng_state(device), "fingerprint": fingerprint}, tmp)
    os.replace(tmp, path)


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
