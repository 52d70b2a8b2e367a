"""extract-clip: per-layer CLIP tokens of every stimulus -> the features cache (:mod:`.cache`).

``--images`` picks rows and every shard holding one of them is filled whole. A shard's arrays are
written first and its ``shard_done`` flag last, so a run killed anywhere leaves at most unflagged
shards; a rerun deletes their stale objects and computes them again from scratch, with batches that
never cross a shard and start at the same offsets, so the store ends bit-identical to an
uninterrupted run on the same machine. Each shard has exactly one writer: a run hands whole shards
to its workers (one process, or dask.distributed tasks); two runs must not write one store at the
same time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr
from tqdm import tqdm

from .. import __version__
from ..data.nsd import NSD, NSDLayout, _open_hdf5
from ..errors import UserError
from ..store import check_disk, human_bytes
from . import clip
from .cache import (
    CAPTIONS_PER_IMAGE,
    DONE,
    FORMAT_VERSION,
    SHARD_ROWS,
    clear_shard,
    create_store,
    existing_store,
    n_shards,
    projected_bytes,
    shard_bounds,
    store_layout,
)

DTYPES = ("float16", "bfloat16", "float32")


# ---- inputs -----------------------------------------------------------------------------------------
def resolve_stimuli(path: Path | str) -> tuple[Path, NSD | None]:
    """``--stimuli``: an ``nsd_stimuli.hdf5`` or an NSD root holding it; the NSD root too when known
    (for ``--images shared|subject:N`` and for captions)."""
    path = Path(path)
    if path.is_dir():
        nsd = NSD(path)
        if not nsd.stimuli_path.is_file():
            raise UserError(f"--stimuli: {path} holds no {nsd.stimuli_path.relative_to(path)}")
        return nsd.stimuli_path, nsd
    if not path.is_file():
        raise UserError(f"--stimuli: not found: {path} (give nsd_stimuli.hdf5 or the NSD root)")
    parents = path.resolve().parents
    root = parents[3] if len(parents) > 3 else None
    if root is not None and NSDLayout(root).stimuli_path == path.resolve():
        return path, NSD(root)
    return path, None


def describe_source(path: Path, n_samples: int = 64) -> dict:
    """Shape, size and a content fingerprint (sha256 of ``n_samples`` evenly spaced images) of ``imgBrick``.

    The fingerprint is part of the settings a store is resumed with: a regenerated or different
    image file is refused instead of silently mixed in, without hashing 40 GB.
    """
    with _open_hdf5(path) as f:
        if "imgBrick" not in f:
            raise UserError(f"{path}: no 'imgBrick' dataset (found {sorted(f.keys())})")
        images = f["imgBrick"]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or images.shape[0] == 0:
            raise UserError(f"{path}: imgBrick must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        h = hashlib.sha256(repr(images.shape).encode())
        for i in np.unique(np.linspace(0, images.shape[0] - 1, n_samples).astype(int)):
            h.update(images[i].tobytes())
        return {
            "path": str(path),  # as given (resolving it would make every clone's store differ)
            "size": path.stat().st_size,
            "n_images": int(images.shape[0]),
            "image_shape": list(images.shape[1:]),
            "fingerprint": h.hexdigest(),
        }


def select_images(spec: str, n: int, nsd: NSD | None) -> np.ndarray:
    """0-based ids ``--images`` asks for: ``all``, ``shared`` (NSD's shared images), ``subject:N``
    (the subject's images in ``subjectim``) or ``A-B`` (ids A..B inclusive)."""
    spec = str(spec).strip()
    if spec == "all":
        return np.arange(n)
    kind, _, arg = spec.partition(":")
    if spec == "shared" or (kind == "subject" and arg.isdigit()):
        if nsd is None or not nsd.expdesign_path.is_file():
            raise UserError(
                f"--images {spec} needs nsd_expdesign.mat: give --stimuli as the NSD root that holds it"
            )
        design = nsd.expdesign
        if spec == "shared":
            ids = design.sharedix - 1
        else:
            if not 1 <= int(arg) <= design.subjectim.shape[0]:
                raise UserError(f"--images {spec}: subjects are 1..{design.subjectim.shape[0]}")
            ids = design.subjectim[int(arg) - 1] - 1
    elif spec.count("-") == 1 and all(p.isdigit() for p in spec.split("-")):
        a, b = (int(p) for p in spec.split("-"))
        if not a <= b < n:
            raise UserError(f"--images {spec}: need A <= B < {n} (0-based ids of the {n} stimuli)")
        ids = np.arange(a, b + 1)
    else:
        raise UserError(
            f"--images must be all, shared, subject:N or A-B (0-based ids, inclusive), not {spec!r}"
        )
    ids = np.unique(ids)
    if ids.size and not 0 <= ids[0] <= ids[-1] < n:
        raise UserError(f"--images {spec}: ids reach {ids[-1]} but the stimulus file has {n} images")
    return ids


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when there is a GPU, else ``cpu``; anything else must exist here."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:K, not {device!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here")
    return device


def resolve_dtype(dtype: str | None, device: str) -> str:
    """Compute precision: ``auto`` is float16 autocast on a GPU and float32 on the CPU."""
    if dtype in (None, "auto"):
        on_gpu = "cuda" in device or (device == "auto" and torch.cuda.is_available())
        return "float16" if on_gpu else "float32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (or auto), not {dtype!r}")
    return dtype


# ---- the worker side: whole shards, from images to stored bytes ------------------------------------
@dataclass(frozen=True)
class Job:
    """What filling shards needs; plain values, so it pickles to dask workers."""

    out: str
    stimuli: str
    model: str
    pretrained: str
    activation: str
    layers: str
    tokens: str
    dtype: str
    device: str
    batch_size: int
    shard_rows: int
    n_rows: int
    loader_workers: int


@functools.lru_cache(maxsize=2)
def cached_model(model: str, pretrained: str, device: str, activation: str = "auto") -> clip.LoadedModel:
    """A process (a dask worker too) loads the model once and reuses it for all its shards."""
    return clip.load_model(model, pretrained, device, activation)


class _Batches(torch.utils.data.Dataset):
    """Item i = batch i as preprocessed pixels; each loader process opens the HDF5 file itself."""

    def __init__(self, path: str, spans: list[tuple[int, int, int]], transform: Callable) -> None:
        self.path, self.spans, self.transform = path, spans, transform
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        _, a, b = self.spans[i]
        return i, clip.preprocess_images(self.transform, self._file["imgBrick"][a:b])


def _loader(job: Job, transform: Callable, spans: list, on_gpu: bool) -> torch.utils.data.DataLoader:
    """Batches read and preprocessed in background processes, into pinned memory on a GPU.

    A daemonic process (a default dask worker) cannot have children: it reads in-process.
    """
    workers = 0 if multiprocessing.current_process().daemon else job.loader_workers
    return torch.utils.data.DataLoader(
        _Batches(job.stimuli, spans, transform), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=on_gpu, prefetch_factor=4 if workers else None,
    )


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
        for v in out.values():
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
    """Resolve ``auto``; on a local cluster with several GPUs, worker k takes GPU k (mod count)."""
    device = resolve_device(device)
    if device != "cuda" or torch.cuda.device_count() < 2:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    return f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else device


def fill_shards(
    job: Job, shards: Sequence[int], captions: dict[int, np.ndarray] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Compute and write whole shards (the caller guarantees it is their only writer); return rows written.

    ``captions[s]`` holds the (rows, K) captions of shard s when the store has ``text_embeds``.
    Writes run in a background thread while the next shard computes.
    """
    device = _worker_device(job.device)
    loaded = cached_model(job.model, job.pretrained, device, job.activation)
    layers = clip.parse_layers(job.layers, loaded.n_blocks)
    tokens = clip.TokenMode.parse(job.tokens)
    root = Path(job.out)
    group = zarr.open_group(root, mode="r+")
    arrays = {f"layers/{name}": group[f"layers/{name}"] for name in sorted(group["layers"].array_keys())}
    arrays["image_embeds"] = group["image_embeds"]
    if "text_embeds" in group:
        arrays["text_embeds"] = group["text_embeds"]
    done = group[DONE]
    for s in shards:
        clear_shard(root, {**arrays, DONE: done}, s)

    spans = []
    for s in shards:
        a, b = shard_bounds(s, job.shard_rows, job.n_rows)
        spans += [(s, lo, min(lo + job.batch_size, b)) for lo in range(a, b, job.batch_size)]
    on_gpu = torch.device(device).type == "cuda"
    autocast = (
        torch.autocast(torch.device(device).type, dtype=getattr(torch, job.dtype))
        if job.dtype != "float32" else contextlib.nullcontext()
    )

    def compute() -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i, pixels in _loader(job, loaded.preprocess, spans, on_gpu):
            s, a, b = spans[i]
            with torch.no_grad(), autocast:
                toks, embeds = clip.encode_layers(loaded, pixels.to(device, non_blocking=True), layers, tokens)
                out = {f"layers/{k}": v.to(torch.float16) if v.is_floating_point() else v for k, v in toks.items()}
                out["image_embeds"] = embeds.float()
                if "text_embeds" in arrays:
                    s0 = shard_bounds(s, job.shard_rows, job.n_rows)[0]
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
            s0, s1 = shard_bounds(s, job.shard_rows, job.n_rows)
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
def _run_distributed(
    job: Job, shards: list[int], captions: dict[int, np.ndarray] | None, scheduler: str | None,
    workers: int | None, bar: tqdm,
) -> None:
    """The same :func:`fill_shards` as dask.distributed tasks, each owning whole shards."""
    import dask
    from distributed import Client, LocalCluster, as_completed

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


def extract_clip(
    stimuli: Path | str,
    out: Path | str,
    *,
    model: str = "ViT-L-14",
    pretrained: str = "openai",
    activation: str = "auto",
    layers: str = "8,16,24",
    tokens: str = "all",
    images: str = "all",
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "auto",
    captions: bool | None = None,
    shard_rows: int = SHARD_ROWS,
    chunk_rows: int | None = None,
    loader_workers: int | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    report: Callable[[str], None] = lambda line: None,
) -> Path:
    """Fill (or resume) the CLIP cache at ``out``; see the module docstring for the layout.

    ``activation``: ``auto`` builds the activation the weights were trained with (QuickGELU for
    OpenAI's; see :func:`pipeline.features.clip.resolve_architecture`), ``gelu``/``quick_gelu``
    force one (refused when it contradicts a tag). ``captions``: None = write ``text_embeds`` when the NSD root has the stim-info table and COCO
    annotations, True = require them, False = skip. ``workers``/``scheduler`` run the shards on
    dask.distributed (a local cluster of N processes, or a running scheduler whose workers see
    the same ``stimuli`` and ``out`` paths; ``device=auto`` is then resolved on each worker, so pass
    ``dtype`` when this process has no GPU but the workers do). ``report`` receives the size
    projection line.
    """
    out = Path(out)
    pretrained = "none" if pretrained in (None, "") else str(pretrained)
    token_mode = clip.TokenMode.parse(str(tokens))
    for name, value in (("--batch-size", batch_size), ("--shard-rows", shard_rows)):
        if int(value) < 1:
            raise UserError(f"{name} must be >= 1, not {value}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, not {workers}")
    distributed = bool(scheduler) or workers is not None
    device = device if distributed else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if loader_workers is None:
        loader_workers = min(8, (os.cpu_count() or 1) - 1) if "cuda" in device or distributed else 0

    path, nsd = resolve_stimuli(stimuli)
    source = describe_source(path)
    n = source["n_images"]
    wanted = select_images(images, n, nsd)
    loaded = cached_model(model, pretrained, "cpu" if distributed else device, activation)
    layer_specs = clip.parse_layers(str(layers), loaded.n_blocks)
    token_mode.check(loaded.grid_hw)

    has_captions = (
        nsd is not None and nsd.stim_info_path.is_file()
        and nsd.annotations_path("captions", "train2017").parent.is_dir()
    )
    if captions and not has_captions:
        raise UserError(
            f"captions requested but --stimuli {stimuli} is not an NSD root with "
            "nsddata/experiments/nsd/nsd_stim_info_merged.csv and nsddata_stimuli/stimuli/nsd/annotations/"
        )
    use_captions = has_captions if captions is None else bool(captions)

    layout = store_layout(loaded, layer_specs, token_mode, n, shard_rows, chunk_rows, use_captions)
    settings = {
        "format": FORMAT_VERSION,
        "model": loaded.name,
        "open_clip_model": loaded.architecture.name,
        "activation": loaded.architecture.activation,
        "model_config": loaded.config,
        "weights": loaded.weights_sha256 or loaded.pretrained,
        "layers": [layer.name for layer in layer_specs],
        "tokens": str(token_mode),
        "dtype": dtype,
        "captions": use_captions,
        "shard_rows": shard_rows,
        "chunk_rows": next(iter(layout.values())).chunk_rows,
        "source": {k: source[k] for k in ("size", "n_images", "image_shape", "fingerprint")},
    }
    attrs = {
        "settings": settings,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "open_clip_model": loaded.architecture.name,
        "activation": loaded.architecture.activation,
        "weights_sha256": loaded.weights_sha256,
        "preprocessing": loaded.preprocess_description(),
        "layers": {layer.name: {"blocks": list(layer.blocks), "aggregate": layer.aggregate, "projected": layer.project}
                   for layer in layer_specs},
        "layer_convention": "1-based transformer blocks; block k's output (before ln_post for the last); "
                            "K_proj = block K -> ln_post -> visual.proj, every token",
        "projection": loaded.projection_note() if any(layer.project for layer in layer_specs) else None,
        "tokens": str(token_mode),
        "token_layout": token_mode.describe(),
        "compute_dtype": dtype,
        "storage_dtypes": {name: spec.dtype for name, spec in layout.items()},
        "source": source,
        "captions": {"per_image": CAPTIONS_PER_IMAGE, "source": "COCO annotations via nsd_stim_info_merged.csv"}
        if use_captions else None,
        "N": n,
        "versions": {"nsd-feature-cache": __version__, "open_clip": version("open_clip_torch"),
                     "torch": torch.__version__, "zarr": zarr.__version__},
    }

    existing = existing_store(out, settings, overwrite)
    done = existing[DONE][:] if existing is not None else np.zeros(n_shards(n, shard_rows), bool)
    requested = np.unique(wanted // shard_rows).tolist()
    todo = {s: shard_bounds(s, shard_rows, n) for s in requested if not done[s]}
    total = sum(b - a for a, b in todo.values())
    need = projected_bytes(layout, total)
    free = check_disk(out, need)
    report(
        f"{out}: {len(layout)} arrays, {human_bytes(projected_bytes(layout, n))} for all {n} "
        f"images uncompressed; {len(requested) - len(todo)} of {len(requested)} requested shards already done, "
        f"writing {len(todo)} ({human_bytes(need)} at most, {human_bytes(free)} free)"
    )
    if existing is None:
        create_store(out, layout, attrs)
    if not todo:
        return out

    job = Job(
        out=str(out), stimuli=str(path), model=model, pretrained=str(pretrained), activation=activation, layers=str(layers),
        tokens=str(token_mode), dtype=dtype, device=device, batch_size=int(batch_size), shard_rows=shard_rows,
        n_rows=n, loader_workers=loader_workers,
    )
    caption_table = None
    if use_captions:  # read once here (COCO's json is large), handed to workers shard by shard
        table = nsd.captions(np.concatenate([np.arange(a, b) for a, b in todo.values()]), CAPTIONS_PER_IMAGE)
        offsets = np.cumsum([0] + [b - a for a, b in todo.values()])
        caption_table = {s: table[offsets[k] : offsets[k + 1]] for k, s in enumerate(todo)}
    with tqdm(total=total, unit="img", desc="extract-clip", disable=not progress, dynamic_ncols=True) as bar:
        if distributed:
            _run_distributed(job, list(todo), caption_table, scheduler, workers, bar)
        else:
            fill_shards(job, list(todo), caption_table, on_rows=bar.update)
    missing = [s for s in todo if not zarr.open_array(out / DONE, mode="r")[s]]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} were not completed")
    return out
