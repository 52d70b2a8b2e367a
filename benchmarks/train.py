"""Training steps of mclip at NSD shapes and layout: from the CLIP cache vs. running CLIP every step.

The replaced design (MindEye-style notebooks) encodes each batch's images again at every step. This
script builds, in a temporary folder, an fMRI store and a CLIP store with the real layout and row
shapes (prepare-fmri's 16 MB beta chunks; extract-clip's 1024-row shards, default chunks, a
257x1024 float16 ``layers/11-20_mean`` and 768-d ``image_embeds``; random values), and times a few
steps of the same mclip (the real default sizes: width 1024, depth 2, token rank 64, 15,724 voxels)
fed four ways, on the same device:

- ``cache_in_memory``: the fit-adapters data path, betas and targets loaded once;
- ``cache_streamed``: the same with the token target streamed in blocks of whole chunks (the path
  for targets larger than memory);
- ``cache_lazy_reads``: every batch read straight from the stores (the data path before; it decodes
  a whole chunk per row it touches);
- ``clip_every_step``: each batch's 425-px images through ViT-L/14 (random weights, the real
  architecture) for the same targets, then the same step.

Each variant runs one untimed warm-up step, then ``--steps`` (``--clip-steps`` for CLIP) timed
steps. ``decoded_mb_per_epoch`` is what one epoch decodes from the stores: measured by the bank's reads
(:class:`pipeline.store.ReadStats`, with ``read_amplification`` = decoded / needed bytes) for the
cache paths, computed from the chunk layout for lazy reads, also at full NSD subject scale (27,000
training trials of 9,000 images among 73,000). Random weights and values: only timings and bytes
mean anything.

    python benchmarks/train.py [--images 2048] [--repeats 3] [--batch-size 64] [--steps 5]
        [--clip-steps 2] [--device auto] [--threads N] [--small] [--out result.json]

``--small`` swaps in the demo's tiny ViT, 512 voxels and a demo-sized mclip (a smoke run: seconds).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402  (benchmarks/ is the script's folder)

from pipeline.data.fmri import beta_chunk_rows, row_array  # noqa: E402  (prepare-fmri's chunking, exactly)
from pipeline.features import clip as clip_lib  # noqa: E402
from pipeline.features.cache import DONE, ArraySpec, create_store, default_chunk_rows  # noqa: E402
from pipeline.fitting.adapters.base import FLOC  # noqa: E402
from pipeline.fitting.data import CacheDataset, TargetBank, iter_batches  # noqa: E402
from pipeline.fitting.models import build_adapter  # noqa: E402
from pipeline.fitting.train import resolve_device, step_runner  # noqa: E402
from pipeline.store import atomic_store, take_rows  # noqa: E402

SEMANTIC = "image_embeds"


@dataclass(frozen=True)
class Sizes:
    """Shapes of the stores, the CLIP model run every step and the adapters."""

    clip_model: str = "ViT-L-14"
    layers: str = "11-20:mean"
    tokens: int = 257
    width: int = 1024
    embed: int = 768
    voxels: int = 15_724
    image_size: int = 425
    shard: int = 1024
    adapters: dict = field(default_factory=dict)  # method -> config overrides

    @property
    def detail(self) -> str:
        return "layers/" + self.layers.replace(":", "_")


REAL = Sizes()
SMALL = Sizes("nsd-tiny-vit", "2-4:mean", 17, 64, 32, 512, 32, 64, {
    "mclip": {"width": 64, "depth": 1, "token_rank": 8},
    "litemind": {"patch_size": 64, "dims": (32, 32, 32, 17), "depths": (1, 1, 1, 1)},
})
NSD = {"images": 73_000, "train_images": 9_000, "train_trials": 27_000}


# ---- the stores ---------------------------------------------------------------------------------------
def layout(n: int, z: Sizes = REAL) -> dict[str, ArraySpec]:
    """What extract-clip lays out for ViT-L/14, all tokens, ``11-20:mean`` (see features/cache.py)."""
    return {
        z.detail: ArraySpec((n, z.tokens, z.width), "float16", default_chunk_rows(z.tokens * z.width * 2, z.shard), z.shard),
        SEMANTIC: ArraySpec((n, z.embed), "float32", z.shard, z.shard),
    }


def build_clip_store(out: Path, n: int, rng: np.random.Generator, z: Sizes = REAL) -> None:
    create_store(out, layout(n, z), {"settings": {"benchmark": "random values"}})
    root = zarr.open_group(out, mode="r+")
    for s, start in enumerate(tqdm(range(0, n, z.shard), desc="clip store", unit="shard")):
        stop = min(start + z.shard, n)
        root[z.detail][start:stop] = rng.standard_normal((stop - start, z.tokens, z.width), np.float32).astype(np.float16)
        root[SEMANTIC][start:stop] = rng.standard_normal((stop - start, z.embed), np.float32)
        root[DONE][s] = True


def voxel_labels(voxels: int) -> dict[str, np.ndarray]:
    """ROI labels: about a third of the voxels category-selective, like subj01."""
    labels = {name: np.zeros(voxels, np.int32) for name in FLOC}
    for k, name in enumerate(FLOC):
        labels[name][k * voxels // 12 : (k + 1) * voxels // 12] = 1
    return labels


def build_fmri_store(out: Path, image_ids: np.ndarray, rng: np.random.Generator, z: Sizes = REAL) -> None:
    with atomic_store(out) as root:
        betas = row_array(root, "train/betas", (len(image_ids), z.voxels), np.float32)
        for start in range(0, len(image_ids), 4096):
            stop = min(start + 4096, len(image_ids))
            betas[start:stop] = rng.standard_normal((stop - start, z.voxels), np.float32)
        row_array(root, "train/image_ids", image_ids.shape, np.int64)[...] = image_ids
        for name, labels in voxel_labels(z.voxels).items():
            row_array(root, f"voxels/{name}", (z.voxels,), np.int32)[...] = labels


# ---- what a data path decodes ---------------------------------------------------------------------------
class Layout:
    """Chunk rows and row bytes of an array, for computing what reads decode without the data."""

    def __init__(self, chunk_rows: int, row_bytes: int):
        self.chunk_rows, self.row_bytes = chunk_rows, row_bytes

    def decoded(self, rows: np.ndarray) -> int:
        return len(np.unique(rows // self.chunk_rows)) * self.chunk_rows * self.row_bytes


def lazy_epoch_bytes(image_ids: np.ndarray, batch: int, betas: Layout, targets: list[Layout], seed: int = 0) -> int:
    """Bytes one shuffled epoch decodes when every batch reads its rows from the stores."""
    order = np.random.default_rng(seed).permutation(len(image_ids))
    total = 0
    for start in range(0, len(order) - batch + 1, batch):
        rows = order[start : start + batch]
        total += betas.decoded(rows) + sum(t.decoded(image_ids[rows]) for t in targets)
    return total


def store_layouts(n_rows: int, n_images: int, z: Sizes = REAL) -> tuple[Layout, list[Layout]]:
    spec = layout(n_images, z)
    return Layout(beta_chunk_rows((n_rows, z.voxels), np.float32), z.voxels * 4), [Layout(s.chunk_rows, s.row_bytes) for s in spec.values()]


# ---- feeding the model --------------------------------------------------------------------------------------
class LazyReads(torch.utils.data.Dataset):
    """The previous data path: each batch reads its betas and targets from the stores."""

    def __init__(self, fmri: zarr.Group, clip: zarr.Group, targets: list[str]):
        self.betas, self.clip, self.targets = fmri["train/betas"], clip, targets
        self.image_ids = fmri["train/image_ids"][...]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitems__(self, index) -> dict:
        ids = self.image_ids[index]
        return {
            "x": torch.from_numpy(take_rows(self.betas, index)),
            "image_id": torch.from_numpy(ids),
            "targets": {t: torch.from_numpy(take_rows(self.clip[t], ids).astype(np.float32)) for t in self.targets},
        }


def clip_batches(data: CacheDataset, loaded: clip_lib.LoadedModel, batch: int, seed: int,
                 device: torch.device, z: Sizes = REAL) -> Iterator[dict]:
    """Batches whose targets come from running ViT-L/14 on the batch's images (random 425-px pixels)."""
    layers = clip_lib.parse_layers(z.layers, loaded.n_blocks)
    rng = np.random.default_rng(seed)
    use = torch.autocast("cuda", torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for index in itertools.count():
        rows = rng.choice(len(data), batch, replace=False)
        images = rng.integers(0, 256, (batch, z.image_size, z.image_size, 3), dtype=np.uint8)
        with use:
            pixels = clip_lib.preprocess_batch(loaded, images).to(device)
            tokens, embeds = clip_lib.encode_layers(loaded, pixels, layers, clip_lib.TokenMode("all"))
        yield {
            "x": data.betas[torch.as_tensor(rows)],
            "image_id": torch.from_numpy(data.image_ids[rows]),
            "targets": {z.detail: tokens[z.detail.removeprefix("layers/")].float(), SEMANTIC: embeds.float()},
        }


def time_steps(model, batches: Iterator[dict], steps: int, device: torch.device,
               warmup: Iterator[dict] | None = None) -> dict:
    """One untimed warm-up step (from ``warmup``, default ``batches``), then ``steps`` timed steps of
    the real training loop body (:func:`pipeline.fitting.train.step_runner`)."""
    run = step_runner(copy.deepcopy(model), device, {"grad_clip": 1.0, "amp": True})
    run(itertools.islice(warmup or batches, 1))
    t0 = time.perf_counter()
    run(itertools.islice(batches, steps))
    seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": round(seconds, 3), "steps_per_s": round(steps / seconds, 4)}


def adapter_steps(method: str, z: Sizes, device: torch.device, images: int = 256, batch: int = 64,
                  steps: int = 5) -> dict:
    """Training steps/s of ``method`` (mclip | litemind) at sizes ``z`` on random targets held in
    memory (the fit-adapters data path; litemind predicts the token target ``z.detail``)."""
    rng = np.random.default_rng(0)
    clip = {z.detail: rng.standard_normal((images, z.tokens, z.width), np.float32).astype(np.float16),
            SEMANTIC: rng.standard_normal((images, z.embed), np.float32)}
    betas = rng.standard_normal((images, z.voxels), np.float32)
    data = CacheDataset(betas, np.arange(images), clip, list(clip), voxel_labels(z.voxels))
    config = {"mclip": {"detail_target": z.detail, "semantic_target": SEMANTIC},
              "litemind": {"targets": (z.detail,)}}[method]
    model = build_adapter(method, {**config, **z.adapters.get(method, {})}, data, seed=0)
    run = time_steps(model, iter_batches(data.to(device), batch, seed=1), steps, device)
    return {"method": method, "n_params": model.n_params, "batch_size": batch, **run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="images in the CLIP store (2 shards)")
    parser.add_argument("--repeats", type=int, default=3, help="training trials per image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each cache variant")
    parser.add_argument("--clip-steps", type=int, default=2, help="timed steps with CLIP in the loop")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--small", action="store_true", help="the demo's tiny ViT, 512 voxels, demo-sized mclip (smoke runs)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    z = SMALL if args.small else REAL
    detail = z.detail
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    image_ids = rng.permutation(np.repeat(np.arange(args.images), args.repeats))  # trials, shuffled in time
    b = args.batch_size
    result: dict = {
        "benchmark": "mclip training steps at NSD shapes: CLIP cache vs CLIP every step",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "data": {"images": args.images, "train_rows": len(image_ids), "voxels": z.voxels, "rows_are": "trials",
                 "targets": {detail: [z.tokens, z.width], SEMANTIC: [z.embed]},
                 "layout": {k: {"chunk_rows": s.chunk_rows, "shard_rows": s.shard_rows, "dtype": s.dtype}
                            for k, s in layout(args.images, z).items()}},
        "batch_size": b,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        build_clip_store(tmp / "clip.zarr", args.images, rng, z)
        build_fmri_store(tmp / "fmri.zarr", image_ids, rng, z)
        result["stores_build_seconds"] = round(time.perf_counter() - t0, 1)
        fmri, clip = zarr.open_group(tmp / "fmri.zarr", mode="r"), zarr.open_group(tmp / "clip.zarr", mode="r")

        t0 = time.perf_counter()
        memory = CacheDataset.from_stores(fmri, clip, [detail, SEMANTIC], progress=True)
        load = {"seconds": round(time.perf_counter() - t0, 2), "decoded_mb": round(memory.bank.decoded / 1e6, 1),
                "read_amplification": memory.bank.reads.summary()["read_amplification"],
                "bytes_in_memory_mb": round(memory.nbytes_in_memory / 1e6, 1)}
        model = build_adapter("mclip", {"detail_target": detail, "semantic_target": SEMANTIC, **z.adapters.get("mclip", {})},
                              memory, seed=0)
        result["model"] = {"method": "mclip", "n_params": model.n_params, "parameter_counts": model.parameter_counts()}
        images = np.unique(image_ids)
        variants = {}
        run = time_steps(model, iter_batches(memory.to(device), b, seed=1), args.steps, device)
        variants["cache_in_memory"] = {**run, "load_once": load, "decoded_mb_per_epoch": 0.0}

        vectors = len(images) * z.embed * 4
        streamed = CacheDataset.from_stores(fmri, clip, [detail, SEMANTIC], memory=vectors)
        run = time_steps(model, iter_batches(streamed, b, seed=1), args.steps, device)
        bank = TargetBank(clip, [detail, SEMANTIC], images, memory=vectors)  # a fresh one: nothing held yet
        first = np.flatnonzero(bank.block_of_image == 0)
        t0 = time.perf_counter()
        bank.gather(first)  # reads block 0, what the background reader does once per block and epoch
        block_seconds = round(time.perf_counter() - t0, 3)
        before = streamed.bank.reads.summary()
        for _ in iter_batches(streamed, b, seed=2):  # one epoch: what its reads decode, measured
            pass
        epoch = {k: streamed.bank.reads.summary()[k] - before[k] for k in ("decoded_bytes", "needed_bytes")}
        variants["cache_streamed"] = {**run, "streamed": sorted(streamed.bank.streamed),
                                      "blocks": streamed.bank.n_blocks,
                                      "block_read_seconds": block_seconds,
                                      "block_decoded_mb": round(bank.decoded / 1e6, 1),
                                      "decoded_mb_per_epoch": round(epoch["decoded_bytes"] / 1e6, 1),
                                      "read_amplification": round(epoch["decoded_bytes"] / max(epoch["needed_bytes"], 1), 3)}

        betas_layout, target_layouts = store_layouts(len(image_ids), args.images, z)
        run = time_steps(model, iter_batches(LazyReads(fmri, clip, [detail, SEMANTIC]), b, seed=1), args.steps, device)
        per_epoch = lazy_epoch_bytes(image_ids, b, betas_layout, target_layouts)
        variants["cache_lazy_reads"] = {**run, "decoded_mb_per_epoch": round(per_epoch / 1e6, 1),
                                        "decoded_mb_per_batch": round(per_epoch / (len(image_ids) // b) / 1e6, 1)}

        loaded = clip_lib.load_model(z.clip_model, "none", device=str(device))
        run = time_steps(model, clip_batches(memory, loaded, b, 2, device, z), args.clip_steps, device,
                         warmup=clip_batches(memory, loaded, 2, 3, device, z))  # a small warm-up batch
        variants["clip_every_step"] = {**run, "clip_model": f"{z.clip_model} (open_clip, random weights)",
                                       "image_size": z.image_size, "decoded_mb_per_epoch": 0.0}
    result["variants"] = variants
    clip_rate = variants["clip_every_step"]["steps_per_s"]
    result["speedup_vs_clip_every_step"] = {k: round(v["steps_per_s"] / clip_rate, 1) for k, v in variants.items()
                                            if k != "clip_every_step"}
    nsd_ids = np.random.default_rng(1).choice(NSD["images"], NSD["train_images"], replace=False)
    nsd_trials = np.random.default_rng(2).permutation(np.repeat(nsd_ids, NSD["train_trials"] // NSD["train_images"]))
    betas_layout, target_layouts = store_layouts(len(nsd_trials), NSD["images"])
    result["computed_at_nsd_subject_scale"] = {
        **NSD, "batch_size": b,
        "lazy_reads_decoded_gb_per_epoch": round(lazy_epoch_bytes(nsd_trials, b, betas_layout, target_layouts) / 1e9, 1),
        "streamed_decoded_gb_per_epoch": round(target_layouts[0].decoded(nsd_ids) / 1e9, 1),
        "in_memory_gb_loaded_once": round((len(nsd_trials) * REAL.voxels * 4 + NSD["train_images"]
                                           * (REAL.tokens * REAL.width * 2 + REAL.embed * 4)) / 1e9, 1),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
