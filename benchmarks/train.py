"""Time per training epoch of ``mclip`` fed from the CLIP cache vs. fed by running CLIP every step.

The second is the design this project replaces (MindEye-style notebooks encode each batch's images
again at every step). Both runs train the same tiny mclip (same initial weights, same batches) on the
demo's subject 1, trial-level rows, on the same device; only the source of the targets differs. The
cache is built here with the same tiny open_clip model (what extract-clip stores: float16 arrays
chunked by rows); its one-off build time is reported too. Timings come from a single run.

    python benchmarks/train.py [--demo DIR] [--epochs 5] [--device auto] [--threads N] [--out result.json]

Prints one JSON object. The tiny ViT has random weights: only the timings mean anything.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402  (benchmarks/ is the script's folder)

from pipeline.data.demo import make_demo  # noqa: E402
from pipeline.data.fmri import prepare_fmri  # noqa: E402
from pipeline.data.nsd import NSD  # noqa: E402
from pipeline.features import clip as clip_lib  # noqa: E402
from pipeline.fitting.data import CacheDataset  # noqa: E402
from pipeline.fitting.models import adapter_targets, build_adapter  # noqa: E402
from pipeline.fitting.train import resolve_device, train  # noqa: E402
from pipeline.store import (
    compressor,  # noqa: E402
    take_rows,  # noqa: E402
)

LAYERS = "2-4:mean"
MODEL = {
    "detail_target": "layers/2-4_mean",
    "semantic_target": "image_embeds",
    "width": 64,
    "depth": 1,
    "token_rank": 8,
}


def build_cache(
    loaded: clip_lib.LoadedModel, stimuli: h5py.Dataset, out: Path, device: torch.device, batch: int = 64
) -> float:
    """Encode every stimulus once into ``out`` (Zarr 3, float16, row chunks); returns seconds."""
    t0 = time.perf_counter()
    layers = clip_lib.parse_layers(LAYERS, loaded.n_blocks)
    n = stimuli.shape[0]
    group = zarr.open_group(out, mode="w", zarr_format=3)
    arrays = {}
    for start in range(0, n, batch):
        px = clip_lib.preprocess_batch(loaded, stimuli[start : start + batch]).to(device)
        tokens, embeds = clip_lib.encode_layers(loaded, px, layers, clip_lib.TokenMode("all"))
        for name, value in {**{f"layers/{k}": v for k, v in tokens.items()}, "image_embeds": embeds}.items():
            if name not in arrays:
                shape = (n, *value.shape[1:])
                arrays[name] = group.create_array(
                    name, shape=shape, dtype="float16", chunks=(batch, *shape[1:]), compressors=[compressor()]
                )
            arrays[name][start : start + len(value)] = value.cpu().numpy().astype(np.float16)
    return time.perf_counter() - t0


class OnlineClipDataset(torch.utils.data.Dataset):
    """The replaced design: every batch reads its images and runs CLIP to get the targets."""

    def __init__(
        self,
        betas: np.ndarray,
        image_ids: np.ndarray,
        stimuli: h5py.Dataset,
        loaded: clip_lib.LoadedModel,
        device: torch.device,
    ):
        self.betas, self.image_ids, self.stimuli, self.loaded, self.device = betas, image_ids, stimuli, loaded, device
        self.layers = clip_lib.parse_layers(LAYERS, loaded.n_blocks)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitems__(self, index: list[int]) -> dict:
        ids = self.image_ids[index]
        px = clip_lib.preprocess_batch(self.loaded, take_rows(self.stimuli, ids)).to(self.device)
        tokens, embeds = clip_lib.encode_layers(self.loaded, px, self.layers, clip_lib.TokenMode("all"))
        return {
            "x": torch.from_numpy(self.betas[index]),
            "image_id": torch.from_numpy(ids),
            "targets": {**{f"layers/{k}": v.float() for k, v in tokens.items()}, "image_embeds": embeds.float()},
        }


def epoch_seconds(model, data, epochs: int, device: str) -> list[float]:
    settings = {
        "epochs": epochs,
        "batch_size": 32,
        "lr": 3e-3,
        "val_fraction": 0.0,
        "patience": None,
        "progress": False,
        "device": device,
    }
    return [h["seconds"] for h in train(model, data, settings).history]


def summary(seconds: list[float]) -> dict:
    steady = seconds[1:] or seconds  # the first epoch includes one-off warm-up
    return {
        "epoch_seconds": [round(s, 4) for s in seconds],
        "median_epoch_seconds": round(statistics.median(steady), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="an existing demo NSD root (default: make one in a temp dir)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = args.demo or make_demo(tmp / "demo")
        fmri = zarr.open_group(
            prepare_fmri(root, 1, tmp / "subj01.zarr", average_repeats=False, progress=False), mode="r"
        )
        loaded = clip_lib.load_model(
            "nsd-tiny-vit", str(Path(root) / "demo" / "nsd-tiny-vit.safetensors"), device=str(device)
        )
        with NSD(root).stimuli() as stimuli:
            build_s = build_cache(loaded, stimuli, tmp / "clip.zarr", device)
            clip = zarr.open_group(tmp / "clip.zarr", mode="r")
            n_images = clip["image_embeds"].shape[0]
            cached = CacheDataset.from_stores(fmri, clip, adapter_targets("mclip", MODEL))
            online = OnlineClipDataset(fmri["train/betas"][...], fmri["train/image_ids"][...], stimuli, loaded, device)

            first = list(range(8))
            a, b = cached.__getitems__(first)["targets"], online.__getitems__(first)["targets"]
            diff = max(float((a[k] - b[k].cpu()).abs().max()) for k in a)

            model = build_adapter("mclip", MODEL, cached, seed=0)
            n_params = model.n_params
            from_cache = epoch_seconds(model, cached, args.epochs, str(device))
            from_clip = epoch_seconds(build_adapter("mclip", MODEL, cached, seed=0), online, args.epochs, str(device))

    result = {
        "benchmark": "mclip training epoch: CLIP cache vs CLIP every step",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data": {
            "subject": 1,
            "rows": len(cached),
            "voxels": cached.n_voxels,
            "images_in_cache": n_images,
            "rows_are": "trials",
        },
        "clip_model": "nsd-tiny-vit (demo, random weights)",
        "targets": cached.targets,
        "model": {"method": "mclip", "config": MODEL, "n_params": n_params},
        "batch_size": 32,
        "epochs": args.epochs,
        "from_cache": summary(from_cache),
        "clip_every_step": summary(from_clip),
        "speedup": round(
            statistics.median(from_clip[1:] or from_clip) / statistics.median(from_cache[1:] or from_cache), 2
        ),
        "cache_build_seconds_once": round(build_s, 3),
        "cache_vs_online_target_max_abs_diff": diff,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
