"""Several processes, one training run: ``torchrun --nproc-per-node N cli.py fit-adapters ...``.

torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`setup` then joins the process group
(NCCL on GPUs, gloo on CPU). Every process builds the same model from the same seed and walks the
same global batch order; each reads only its contiguous shard of every batch
(:func:`pipeline.fitting.data.iter_batches` ``shard=``), DistributedDataParallel averages the
gradients, and process 0 alone writes checkpoints and outputs.

Contrastive terms are not a mean over rows, so averaging per-process losses would change them (fewer
negatives per process). Inside :func:`gathering` (the training forward), :func:`gather` concatenates
a tensor's shards from every process, with gradient (``torch.distributed.nn.all_gather``): each
process then computes the contrastive term of the whole global batch. Its backward sums the N
processes' identical gradients, which DDP's averaging divides by N again, while per-row means (MSE,
token cosine) average over equal shards to the global mean: the update equals a single process with
the same global batch, up to float summation order, as long as the forward draws no random numbers
(dropout, DropPath, ROI dropout draw different masks per process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

_GATHER = False


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def setup(device: torch.device) -> bool:
    """Join torchrun's process group (once); True when this run has several processes."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return True


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on GPUs, each process uses the GPU of its ``LOCAL_RANK``."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def teardown() -> None:
    """Leave the process group, on every process, right after the last collective (the end of training).

    Process 0 then saves, predicts and writes the report outside any collective: the others exit
    instead of waiting in a barrier that NCCL's watchdog would kill after 10 minutes. The barrier
    here is met at once, since every process stops at the same epoch (:func:`from_main`).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def gathering(active: bool) -> Iterator[None]:
    """Within this block :func:`gather` concatenates the shards of every process."""
    global _GATHER
    before, _GATHER = _GATHER, active
    try:
        yield
    finally:
        _GATHER = before


def gather(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` (B, ...) of this process -> (N * B, ...) of all processes, in rank order, with gradient
    to the local part; ``t`` itself outside :func:`gathering` or a single process."""
    if t is None or not _GATHER or not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    if t.requires_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t), 0)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def mean_over_processes(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over the processes (identical logs on every process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def from_main(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Process 0's values on every process, for decisions all must share (the validation loss that
    picks the best epoch and stops training early): processes that stopped at different epochs
    would wait forever in each other's collectives."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return dict(zip(keys, t.tolist()))
