"""The shard worker and driver of every extraction: stimuli -> model -> whole shards of a features cache.

A shard's arrays are written first and its ``shard_done`` flag last, so a run killed anywhere
leaves at most unflagged shards; a rerun deletes their stale objects and computes them again from
scratch, with batches that never cross a shard and start at the same offsets, so the store ends
bit-identical to an uninterrupted run on the same machine. Each shard has exactly one writer: a run
hands whole shards to its workers (one process, or dask.distributed tasks); two runs must not
write one store at the same time.

What differs between kinds of stimuli is a :class:`Source` (:class:`pipeline.features.extract.ImageSource`:
NSD's ``imgBrick``; :class:`pipeline.features.video.VideoSource`: movie clips): how a batch of rows
is read and which arrays it encodes to. :func:`fill_shards` and :func:`fill_store` do the rest.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import zarr
from tqdm import tqdm

from .. import __version__
from ..device import resolve_device, worker_gpu
from ..errors import UserError
from ..store import check_disk, human_bytes
from . import clip
from .cache import (
    DONE,
    FORMAT_VERSION,
    clear_shard,
    create_store,
    existing_store,
    n_shards,
    projected_bytes,
    shard_bounds,
)
from .spec import ClipSpec, Execution

DTYPES = ("float16", "bfloat16", "float32")


def resolve_dtype(dtype: str | None, device: str) -> str:
    """Compute precision: ``auto`` is float16 autocast on a GPU and float32 on the CPU."""
    if dtype in (None, "auto"):
        on_gpu = "cuda" in device or (device == "auto" and torch.cuda.is_available())
        return "float16" if on_gpu else "float32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (or auto), not {dtype!r}")
    return dtype


# ---- the worker side: whole shards, from stimuli to stored bytes -----------------------------------
class Source(Protocol):
    """What a kind of stimulus gives the shard worker; a picklable value (it travels to dask workers)."""

    def dataset(self, spans: list[tuple[int, int, int]], transform: Callable) -> torch.utils.data.Dataset:
        """Item i = the model inputs of rows ``spans[i][1]:spans[i][2]`` (read in a loader process)."""

    def encode(self, loaded: clip.LoadedModel, inputs, layers: list[clip.LayerSpec], tokens: clip.TokenMode,
               device: str) -> dict[str, torch.Tensor]:
        """One batch of inputs -> every array of the store except ``text_embeds``, by path."""


def layer_outputs(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`clip.encode_layers` tokens -> store paths, float16 (merged-token sizes stay integers)."""
    return {f"layers/{k}": v.to(torch.float16) if v.is_floating_point() else v for k, v in tokens.items()}


@dataclass(frozen=True)
class Job:
    """What filling shards needs: the resolved settings of :func:`setup`; plain values, so it pickles
    to dask workers."""

    out: str
    source: Source
    spec: ClipSpec
    run: Execution
    n_rows: int


@functools.lru_cache(maxsize=2)
def cached_model(model: str, pretrained: str, device: str, activation: str = "auto") -> clip.LoadedModel:
    """A process (a dask worker too) loads the model once and reuses it for all its shards."""
    return clip.load_model(model, pretrained, device, activation)


def _loader(job: Job, transform: Callable, spans: list, on_gpu: bool) -> torch.utils.data.DataLoader:
    """Batches read and preprocessed by the job's source in background processes, into pinned memory on a GPU.

    A daemonic process (a default dask worker) cannot have children: it reads in-process.
    """
    workers = 0 if multiprocessing.current_process().daemon else job.run.loader_workers
    return torch.utils.data.DataLoader(
        job.source.dataset(spans, transform), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=on_gpu, prefetch_factor=4 if workers else None,
    )


def device_outputs(out: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The outputs of a batch that live on the accelerator, the only ones a side stream may record.

    Some outputs never leave the host (the video source's ``frames`` are the loader's pinned CPU
    tensor), and ``record_stream`` has no CPU kernel.
    """
    return [v for v in out.values() if v.device.type != "cpu"]


def _to_host(results: Iterator[tuple[int, dict[str, torch.Tensor]]], device: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Device -> host copies one batch behind compute.

    On CUDA each batch is copied on a side stream into pinned memory while the next batch
    computes; the host only waits for a copy that was queued a whole batch earlier.
    """
    if torch.device(device).type != "cuda":
        for i, out in results:
            yield i, {k: v.cpu().numpy() for k, v in out.items()}
        return
    stream = torch.cuda.Stream(device)
    previous = None
    for i, out in results:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            host = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
        for v in device_outputs(out):
            v.record_stream(stream)
        current = (i, host, stream.record_event())
        if previous is not None:
            previous[2].synchronize()
            yield previous[0], {k: v.numpy() for k, v in previous[1].items()}
        previous = current
    if previous is not None:
        previous[2].synchronize()
        yield previous[0], {k: v.numpy() for k, v in previous[1].items()}


def _worker_device(device: str) -> str:
    """Resolve ``auto`` and bind this process to its GPU before any CUDA work.

    On a local dask cluster with several GPUs worker k takes GPU k (mod count); ``set_device``
    makes it the process's current device, so the worker opens a CUDA context on that GPU only.
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        return str(dev)
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        name = None
    dev = worker_gpu(dev, name, torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return str(dev)


def fill_shards(
    job: Job, shards: Sequence[int], captions: dict[int, np.ndarray] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Compute and write whole shards (the caller guarantees it is their only writer); return rows written.

    ``captions[s]`` holds the (rows, K) captions of shard s when the store has ``text_embeds``.
    Writes run in a background thread while the next shard computes.
    """
    spec, rows, batch = job.spec, job.spec.shard_rows, job.run.batch_size
    device = _worker_device(job.run.device)
    loaded = cached_model(spec.model, spec.pretrained, device, spec.activation)
    layers = clip.parse_layers(spec.layers, loaded.n_blocks)
    tokens = clip.TokenMode.parse(spec.tokens)
    root = Path(job.out)
    group = zarr.open_group(root, mode="r+")
    arrays = {name: node for name, node in sorted(group.members(max_depth=None))
              if isinstance(node, zarr.Array) and name != DONE}
    done = group[DONE]
    for s in shards:
        clear_shard(root, {**arrays, DONE: done}, s)

    spans = []
    for s in shards:
        a, b = shard_bounds(s, rows, job.n_rows)
        spans += [(s, lo, min(lo + batch, b)) for lo in range(a, b, batch)]
    on_gpu = torch.device(device).type == "cuda"
    autocast = (
        torch.autocast(torch.device(device).type, dtype=getattr(torch, spec.dtype))
        if spec.dtype != "float32" else contextlib.nullcontext()
    )

    def compute() -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i, inputs in _loader(job, loaded.preprocess, spans, on_gpu):
            s, a, b = spans[i]
            with torch.no_grad(), autocast:
                out = job.source.encode(loaded, inputs, layers, tokens, device)
                if "text_embeds" in arrays:
                    s0 = shard_bounds(s, rows, job.n_rows)[0]
                    out["text_embeds"] = clip.encode_captions(loaded, captions[s][a - s0 : b - s0], device).float()
            yield i, out

    def write(s: int, a: int, buffers: dict[str, np.ndarray]) -> None:
        for name, buf in buffers.items():
            arrays[name][a : a + len(buf)] = buf
        done[s] = True  # last: the shard counts as complete only once all its data is stored

    written = 0
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future | None = None
        buffers: dict[str, np.ndarray] = {}
        for i, host in _to_host(compute(), device):
            s, a, b = spans[i]
            s0, s1 = shard_bounds(s, rows, job.n_rows)
            if a == s0:
                buffers = {k: np.zeros((s1 - s0, *arr.shape[1:]), arr.dtype) for k, arr in arrays.items()}
            for k, v in host.items():
                buffers[k][a - s0 : b - s0] = v
            if b == s1:
                if pending is not None:
                    pending.result()  # at most one shard being written while the next one fills
                pending = writer.submit(write, s, s0, buffers)
                written += s1 - s0
            if on_rows is not None:
                on_rows(b - a)
        if pending is not None:
            pending.result()
    return written


# ---- the driver ------------------------------------------------------------------------------------
def _run_distributed(job: Job, shards: list[int], captions: dict[int, np.ndarray] | None, bar: tqdm) -> None:
    """The same :func:`fill_shards` as dask.distributed tasks, each owning whole shards."""
    import dask
    from distributed import Client, LocalCluster, as_completed

    scheduler, workers = job.run.scheduler, job.run.workers

    with contextlib.ExitStack() as stack:
        if scheduler:
            try:
                client = stack.enter_context(Client(scheduler, timeout="30s"))
            except OSError as exc:
                raise UserError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        else:
            with dask.config.set({"distributed.worker.daemon": False}):  # loaders fork processes
                cluster = stack.enter_context(
                    LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
                )
            client = stack.enter_context(Client(cluster))
        n_workers = max(1, len(client.scheduler_info()["workers"]))
        groups = [list(g) for g in np.array_split(shards, min(len(shards), 4 * n_workers)) if len(g)]
        futures = [
            client.submit(
                fill_shards, job, [int(s) for s in g],
                None if captions is None else {int(s): captions[int(s)] for s in g}, pure=False,
            )
            for g in groups
        ]
        for future in as_completed(futures):
            bar.update(future.result())


@dataclass(frozen=True)
class Setup:
    """One extraction's settings, checked and resolved (device, dtype, loader workers), and its model."""

    loaded: clip.LoadedModel
    layers: list[clip.LayerSpec]
    tokens: clip.TokenMode
    spec: ClipSpec  # model as given (name or config path): what the workers load
    run: Execution

    def job(self, out: Path, source: Source, n_rows: int) -> Job:
        return Job(str(out), source, self.spec, self.run, n_rows)


def setup(spec: ClipSpec, run: Execution) -> Setup:
    """Check the settings, resolve ``auto`` ones and load the model once (on the CPU when workers
    will run it). ``spec.shard_rows`` and ``run.batch_size`` must be set (the source's defaults)."""
    pretrained = "none" if spec.pretrained in (None, "") else str(spec.pretrained)
    token_mode = clip.TokenMode.parse(str(spec.tokens))
    for name, value in (("--batch-size", run.batch_size), ("--shard-rows", spec.shard_rows)):
        if int(value) < 1:
            raise UserError(f"{name} must be >= 1, not {value}")
    if run.workers is not None and run.workers < 1:
        raise UserError(f"--workers must be >= 1, not {run.workers}")
    device = str(run.device) if run.distributed else str(resolve_device(run.device))
    loader_workers = run.loader_workers
    if loader_workers is None:
        loader_workers = min(8, (os.cpu_count() or 1) - 1) if "cuda" in device or run.distributed else 0
    spec = replace(spec, pretrained=pretrained, layers=str(spec.layers), tokens=str(token_mode),
                   dtype=resolve_dtype(spec.dtype, device), shard_rows=int(spec.shard_rows))
    run = replace(run, device=device, batch_size=int(run.batch_size), loader_workers=loader_workers)
    loaded = cached_model(spec.model, pretrained, "cpu" if run.distributed else device, spec.activation)
    layer_specs = clip.parse_layers(spec.layers, loaded.n_blocks)
    token_mode.check(loaded.grid_hw)
    return Setup(loaded, layer_specs, token_mode, spec, run)


def model_settings(st: Setup, layout: dict) -> dict:
    """The part of a store's resume settings that describes the model and the arrays."""
    loaded = st.loaded
    return {
        "format": FORMAT_VERSION,
        "model": loaded.name,
        "open_clip_model": loaded.architecture.name,
        "activation": loaded.architecture.activation,
        "model_config": loaded.config,
        "weights": loaded.weights_sha256 or loaded.pretrained,
        "layers": [layer.name for layer in st.layers],
        "tokens": str(st.tokens),
        "dtype": st.spec.dtype,
        "shard_rows": st.spec.shard_rows,
        "chunk_rows": next(iter(layout.values())).chunk_rows,
    }


def model_attrs(st: Setup, layout: dict) -> dict:
    """The store attributes that describe the model, its layers and the arrays (provenance)."""
    loaded = st.loaded
    return {
        "model": loaded.name,
        "model_source": st.spec.model,  # as given: a config JSON's path rebuilds the model, its stem ("model") does not
        "pretrained": loaded.pretrained,
        "open_clip_model": loaded.architecture.name,
        "activation": loaded.architecture.activation,
        "weights_sha256": loaded.weights_sha256,
        "preprocessing": loaded.preprocess_description(),
        "layers": {layer.name: {"blocks": list(layer.blocks), "aggregate": layer.aggregate, "projected": layer.project}
                   for layer in st.layers},
        "layer_convention": "1-based transformer blocks; block k's output (before ln_post for the last); "
                            "K_proj = block K -> ln_post -> visual.proj, every token",
        "projection": loaded.projection_note() if any(layer.project for layer in st.layers) else None,
        "tokens": str(st.tokens),
        "token_layout": st.tokens.describe(),
        "compute_dtype": st.spec.dtype,
        "storage_dtypes": {name: spec.dtype for name, spec in layout.items()},
    }


def versions() -> dict:
    return {"nsd-feature-cache": __version__, "open_clip": version("open_clip_torch"), "torch": torch.__version__,
            "zarr": zarr.__version__}


def fill_store(
    out: Path, st: Setup, source: Source, layout: dict, settings: dict, attrs: dict, requested: list[int], *,
    overwrite: bool, captions: Callable[[dict[int, tuple[int, int]]], dict[int, np.ndarray]] | None = None,
    report: Callable[[str], None] = lambda line: None, noun: str = "images",
) -> Path:
    """Create (or resume) the store at ``out`` and fill the ``requested`` shards that are not done.

    ``captions(todo)`` gives the caption table of the shards to write when the store has
    ``text_embeds``. ``report`` receives the size projection line.
    """
    n = next(iter(layout.values())).shape[0]
    existing = existing_store(out, settings, overwrite)
    rows = st.spec.shard_rows
    done = existing[DONE][:] if existing is not None else np.zeros(n_shards(n, rows), bool)
    todo = {s: shard_bounds(s, rows, n) for s in requested if not done[s]}
    total = sum(b - a for a, b in todo.values())
    need = projected_bytes(layout, total)
    free = check_disk(out, need)
    report(
        f"{out}: {len(layout)} arrays, {human_bytes(projected_bytes(layout, n))} for all {n} "
        f"{noun} uncompressed; {len(requested) - len(todo)} of {len(requested)} requested shards already done, "
        f"writing {len(todo)} ({human_bytes(need)} at most, {human_bytes(free)} free)"
    )
    if existing is None:
        create_store(out, layout, attrs)
    if not todo:
        return out
    job = st.job(out, source, n)
    caption_table = captions(todo) if captions is not None else None
    with tqdm(total=total, unit=noun[:4], desc="extract-clip", disable=not st.run.progress, dynamic_ncols=True) as bar:
        if st.run.distributed:
            _run_distributed(job, list(todo), caption_table, bar)
        else:
            fill_shards(job, list(todo), caption_table, on_rows=bar.update)
    missing = [s for s in todo if not zarr.open_array(out / DONE, mode="r")[s]]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} were not completed")
    return out
