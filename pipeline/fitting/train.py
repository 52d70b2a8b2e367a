"""The training loop of stage 2's trained adapters (from the caches only; no CLIP runs here).

Typical use (the ``fit-adapters`` stage; data in :mod:`.data`, models in :mod:`.models`)::

    fmri, clip = zarr.open_group(fmri_path, mode="r"), zarr.open_group(clip_path, mode="r")
    targets = adapter_targets("mclip", params)               # the cache arrays the config needs
    data = CacheDataset.from_stores(fmri, clip, targets, split="train")   # betas and targets read once
    model = build_adapter("mclip", params, data, seed=0)     # shapes, ROI voxels, target statistics
    result = train(model, data, TrainConfig(epochs=50, checkpoint_dir=run / "checkpoints"))
    save_adapter(run / "adapters" / "mclip", model, extra={"train": result.as_dict()})
    model = load_adapter(run / "adapters" / "mclip")
    preds = predict(model, fmri["test/betas"][...])          # {target name: (n, ...) float32}

Training parameters are the fields of :class:`TrainConfig`.

Training: AdamW, linear warm-up then cosine decay per step, mixed precision on CUDA (bf16 where
supported, else fp16 with loss scaling), a validation split taken from the training rows by image
(all repeats of an image on the same side), early stopping on the validation loss with the best
weights restored, a checkpoint after every epoch from which an interrupted run (even ``kill -9``)
resumes to the same result, and a progress bar with the running loss. With a fixed seed, CPU runs are
bit-for-bit deterministic. A checkpoint records the identity of its data (hashes of the betas and
targets, see :meth:`CacheDataset.fingerprint`) and settings; a resume against anything else is
refused. On CUDA the dataset's in-memory arrays move to the GPU when they fit in half its free memory.

Only parameters with ``requires_grad`` are optimised (fine-tuning freezes the rest, see
:mod:`.adapters.finetune`). Batches may carry ``subject`` (multi-subject data, :mod:`.cohort`), which
is passed on to ``model.loss``. Under ``torchrun`` the loop runs in every process on its shard of
each batch, with DistributedDataParallel (:mod:`.distributed`); process 0 writes the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..device import resolve_device
from ..errors import UserError
from ..store import atomic_file
from . import distributed
from .adapters.base import Adapter, make_config
from .data import iter_batches, split_by_image

CHECKPOINT_PARTS = ("model", "optimizer", "scheduler", "scaler")


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
    memory_gb: float | None = None  # CLIP targets held in memory; larger ones are streamed. None: half the free RAM
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
        skip = {"device", "memory_gb", "checkpoint_dir", "resume", "progress"}  # the data fingerprint says what streamed
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
    n_trainable: int  # of them optimised in this run
    seconds: float
    processes: int = 1  # torchrun processes that shared each batch

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record(self) -> dict[str, Any]:
        """:meth:`as_dict` without wall-clock seconds: what run outputs keep, since everything DVC
        hashes must be byte-identical between two runs of the same stage (see :meth:`timings`)."""
        out = {k: v for k, v in self.as_dict().items() if k != "seconds"}
        out["history"] = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in self.history]
        return out

    def timings(self) -> dict[str, Any]:
        """The wall-clock seconds :meth:`record` leaves out (``runs/<exp>/timings.json``, no DVC output)."""
        return {"train_seconds": round(self.seconds, 2),
                "epoch_seconds": [round(epoch["seconds"], 3) for epoch in self.history if "seconds" in epoch]}


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


def _to(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
    """(x, targets, image ids, extra keyword arguments of ``model.loss``: the subject of each row)."""
    nb = device.type == "cuda"
    targets = {k: v.to(device, non_blocking=nb) for k, v in batch["targets"].items()}
    extra = {"subject": batch["subject"].to(device, non_blocking=nb)} if "subject" in batch else {}
    return batch["x"].to(device, non_blocking=nb), targets, batch["image_id"].to(device, non_blocking=nb), extra


class _Loss(torch.nn.Module):
    """``model.loss`` as a forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: Adapter):
        super().__init__()
        self.model = model

    def forward(self, x, targets, ids, extra):
        return self.model.loss(x, targets, ids, **extra)


@torch.no_grad()
def evaluate_loss(
    model: Adapter, data: Dataset, batch_size: int, device: torch.device, amp: bool = True
) -> dict[str, float]:
    """Row-weighted mean of each loss term over ``data``, in eval mode."""
    model.eval()
    totals: dict[str, float] = {}
    n = 0
    autocast, _ = _autocast(device, amp)
    for batch in iter_batches(data, batch_size):
        x, targets, ids, extra = _to(batch, device)
        with autocast:
            terms = model.loss(x, targets, ids, **extra)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(x)
        n += len(x)
    return {k: v / max(n, 1) for k, v in totals.items()}


def _fingerprint(model: Adapter, cfg: TrainConfig, data: Dataset, val: Dataset | None) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it: model, settings and data identity."""

    def identity(d: Dataset | None) -> Any:
        return None if d is None else d.fingerprint() if hasattr(d, "fingerprint") else {"rows": len(d)}

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    found = {"model": model.spec(), "train": cfg.fingerprint(), "data": identity(data), "val": identity(val),
             "trainable": trainable}
    return json.loads(json.dumps(found))  # as it reads back from the checkpoint


def _differences(theirs: Any, ours: Any, prefix: str = "") -> list[str]:
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [d for k in sorted(set(theirs) | set(ours)) for d in _differences(theirs.get(k), ours.get(k), f"{prefix}{k}.")]
    return [] if theirs == ours else [prefix.rstrip(".")]


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
    device = distributed.local_device(resolve_device(cfg.device))
    several = distributed.setup(device)
    rank, n_proc = distributed.world()
    ckpt = Path(cfg.checkpoint_dir) / "last.pt" if cfg.checkpoint_dir else None
    fingerprint = _fingerprint(model, cfg, data, val) if ckpt is not None else None
    if device.type == "cuda" and hasattr(data, "to") and data.nbytes_in_memory < torch.cuda.mem_get_info(device)[0] / 2:
        data = data.to(device)  # batches are then gathered on the GPU
    train_set, val, drop_last, steps = _split(data, val, cfg, n_proc)
    total = cfg.epochs * steps
    params, optimizer, scheduler, step = _optimiser(model, cfg, device, several, total)
    autocast, scaler = _autocast(device, cfg.amp)
    state = {"epoch": 0, "history": [], "best_val": math.inf, "best_epoch": 0, "best_state": None, "bad": 0,
             "done": False}
    parts = (model, optimizer, scheduler, scaler)
    shard = (rank, n_proc) if several else None
    resumed_from = None
    cuda_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=cuda_ids):  # the caller's RNG stays put
        torch.manual_seed(cfg.seed)
        if ckpt is not None and cfg.resume and ckpt.exists():
            resumed_from = _load_checkpoint(ckpt, parts, state, fingerprint, device)
        with tqdm(total=total, initial=state["epoch"] * steps, desc=f"train {model.method}", unit="step",
                  disable=not cfg.progress) as bar:
            while not state["done"] and state["epoch"] < cfg.epochs:
                epoch = state["epoch"] + 1
                t0 = time.perf_counter()
                loader = iter_batches(train_set, cfg.batch_size, cfg.seed * 100_003 + epoch, drop_last, shard)
                terms = _train_epoch(parts, step, params, loader, autocast, device, cfg.grad_clip, bar, epoch, several)
                record = {"epoch": epoch, **distributed.mean_over_processes(terms, device)}
                record["lr"] = optimizer.param_groups[0]["lr"]
                if val is not None and len(val):  # process 0's validation decides for all (early stopping)
                    losses = evaluate_loss(model, val, cfg.batch_size, device, cfg.amp)
                    record.update({f"val_{k}": v for k, v in distributed.from_main(losses, device).items()})
                record["seconds"] = time.perf_counter() - t0
                _end_epoch(state, record, model, val is None, cfg.patience)
                bar.set_postfix(
                    epoch=epoch, loss=f"{record['train_loss']:.4f}", val=f"{record.get('val_loss', math.nan):.4f}"
                )
                if ckpt is not None and rank == 0:
                    _save_checkpoint(ckpt, parts, state, fingerprint, device)
    model.load_state_dict(state["best_state"])
    model.eval()
    return TrainResult(
        history=state["history"], best_epoch=state["best_epoch"],
        best_val_loss=state["best_val"] if val is not None else None, epochs_run=state["epoch"],
        stopped_early=state["done"], resumed_from=resumed_from, n_params=model.n_params,
        n_trainable=sum(p.numel() for p in params), seconds=time.perf_counter() - start, processes=n_proc,
    )


def _optimiser(model: Adapter, cfg: TrainConfig, device: torch.device, several: bool,
               total: int) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, Any, torch.nn.Module]:
    """(trainable parameters, AdamW, warm-up + cosine schedule over ``total`` steps, the loss module
    to step: wrapped in DistributedDataParallel under torchrun), with ``model`` moved to ``device``."""
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter of the model is frozen")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = _Loss(model)
    if several:
        from torch.nn.parallel import DistributedDataParallel

        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, int(cfg.warmup * total), cfg.min_lr_ratio)
    )
    return params, optimizer, scheduler, step


def _split(data: Dataset, val: Dataset | None, cfg: TrainConfig, n_proc: int) -> tuple[Dataset, Dataset | None, bool, int]:
    """(training rows, validation rows, drop the last partial batch?, steps per epoch), checked to
    batch evenly over ``n_proc`` processes."""
    train_set = data
    if val is None and cfg.val_fraction:
        rows, val_rows = split_by_image(data.image_ids, cfg.val_fraction, cfg.seed)
        train_set, val = data.subset(rows), data.subset(val_rows)
    if len(train_set) < 2:
        raise UserError(f"training needs at least 2 rows, got {len(train_set)}")
    drop_last = len(train_set) > cfg.batch_size  # a last batch of 1 row has no contrastive signal
    steps = len(train_set) // cfg.batch_size if drop_last else 1
    rows_per_batch = cfg.batch_size if drop_last else len(train_set)
    if rows_per_batch % n_proc:
        raise UserError(f"torchrun with {n_proc} processes: batch_size {cfg.batch_size} (or the {len(train_set)} "
                        f"training rows when fewer) must be a multiple of {n_proc}")
    return train_set, val, drop_last, steps


def _end_epoch(state: dict[str, Any], record: dict[str, Any], model: Adapter, no_val: bool,
               patience: int | None) -> None:
    """Record the epoch in ``state``: keep the best weights (by validation loss), count epochs
    without improvement, and say whether early stopping is due."""
    monitored = record.get("val_loss", record["train_loss"])
    if monitored < state["best_val"] or no_val:
        state.update(best_val=monitored, best_epoch=record["epoch"], bad=0)
        state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        state["bad"] += 1
    state["history"].append(record)
    state["epoch"] = record["epoch"]
    state["done"] = patience is not None and state["bad"] >= patience


def _train_epoch(
    parts: tuple,
    step: torch.nn.Module,
    params: list[torch.nn.Parameter],
    loader: Iterator[dict[str, Any]],
    autocast: torch.autocast,
    device: torch.device,
    grad_clip: float | None,
    bar: tqdm,
    epoch: int,
    several: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss term as ``train_<term>``."""
    model, optimizer, scheduler, scaler = parts
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        x, targets, ids, extra = _to(batch, device)
        with autocast, distributed.gathering(several):
            terms = step(x, targets, ids, extra)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise UserError(f"training diverged at epoch {epoch} (loss {float(loss)}); lower lr or check the inputs")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        n += 1
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{sums['loss'] / n:.4f}")
    return {f"train_{k}": v / max(1, n) for k, v in sums.items()}


def step_runner(
    model: Adapter, device: torch.device, config: TrainConfig | Mapping[str, Any] | None = None
) -> Callable[[Iterable[dict[str, Any]]], dict[str, float]]:
    """The body of :func:`train`'s loop on its own, for timing steps (``benchmarks/``).

    Returns ``run(batches)``, which takes one optimiser step per batch exactly as :func:`train` does
    (same loss, autocast, loss scaling and gradient clipping from ``config``; a constant learning
    rate, no validation, no checkpoints) and returns the mean of each loss term. The optimiser state
    carries over from one call to the next, so a warm-up call can precede the timed one.
    """
    cfg = make_config(TrainConfig, config, "train")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    autocast, scaler = _autocast(device, cfg.amp)
    parts, step = (model, optimizer, scheduler, scaler), _Loss(model)

    def run(batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        with tqdm(disable=True) as bar:
            return _train_epoch(parts, step, params, iter(batches), autocast, device, cfg.grad_clip, bar, 0)

    return run


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _load_checkpoint(path: Path, parts: tuple, state: dict, fingerprint: dict, device: torch.device) -> int:
    """Restore a run from its checkpoint; returns the number of epochs it had done."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    theirs = json.loads(saved.get("fingerprint", "null"))
    if theirs != fingerprint:
        diffs = _differences(theirs, fingerprint) if isinstance(theirs, dict) else ["everything"]
        raise UserError(
            f"{path} was made with other settings or data ({', '.join(diffs[:4])} differ); delete it "
            "(or set resume: false) to start over"
        )
    for part, key in zip(parts, CHECKPOINT_PARTS, strict=True):
        part.load_state_dict(saved[key])
    torch.set_rng_state(saved["rng"]["cpu"])
    if device.type == "cuda" and len(saved["rng"]["cuda"]):
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    state.update({k: saved[k] for k in state})
    return state["epoch"]


def _save_checkpoint(path: Path, parts: tuple, state: dict, fingerprint: dict, device: torch.device) -> None:
    """Everything a resumed run needs, written atomically (a kill leaves the previous checkpoint)."""
    saved = {key: part.state_dict() for part, key in zip(parts, CHECKPOINT_PARTS, strict=True)}
    with atomic_file(path) as tmp:
        torch.save({**state, **saved, "rng": _rng_state(device), "fingerprint": json.dumps(fingerprint)}, tmp)
