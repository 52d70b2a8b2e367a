"""Throughput of extract-clip against the bare model forward and against THINGSvision (JSON output).

In one run, on one device, same images (NSD-sized 425x425 pictures), same batch size, same random
weights (timing only: no number here is a feature-quality metric):

- ``forward``: ``encode_image`` over preprocessed pixels already on the device (the model alone),
  timed before and after the extraction (their mean is the reference: shared machines drift);
- ``extract_clip``: the whole extract-clip run (HDF5 read, open_clip preprocessing, forward with
  the requested blocks, float16 cast, compressed sharded Zarr writes), model already loaded;
- ``thingsvision``: THINGSvision 2.7.3 extracting the same blocks from the same HDF5 file with
  the same transform, run in its own virtual environment (it pins torch 2.0.1, numpy 1.x and
  TensorFlow) as a subprocess, with the same weights loaded from a saved state_dict; skipped with
  a note when ``--tv-python`` does not exist. Set it up once with
  ``python3 -m venv /tmp/tv-venv && /tmp/tv-venv/bin/pip install thingsvision==2.7.3``.

    python benchmarks/extract.py --images 32 --batch-size 8 --device cpu --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
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

from pipeline.demo.nsd import DemoConfig, make_images  # noqa: E402
from pipeline.features import clip  # noqa: E402
from pipeline.features.extract import extract_clip  # noqa: E402
from pipeline.device import resolve_device  # noqa: E402
from pipeline.features.shards import cached_model, resolve_dtype  # noqa: E402

THINGSVISION_SCRIPT = r'''
import json, sys, time
import numpy as np, open_clip, torch
from thingsvision import get_extractor_from_model
from thingsvision.utils.data import DataLoader, HDF5Dataset
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
if args["config"]:  # a custom/tiny config: register it as our side does
    open_clip.add_model_config(args["config"])
model, _, preprocess = open_clip.create_model_and_transforms(args["model"], pretrained=None)
model.load_state_dict(torch.load(args["weights"], map_location="cpu"))
extractor = get_extractor_from_model(model=model.visual.eval(), device=args["device"], backend="pt",
                                     preprocess=preprocess)
modules = [f"transformer.resblocks.{k - 1}" for k in args["blocks"]]

def run(indices, output_dir):
    dataset = HDF5Dataset(hdf5_fp=args["hdf5"], img_ds_key="imgBrick", backend="pt",
                          transforms=extractor.get_transformations(), img_indices=indices)
    batches = DataLoader(dataset=dataset, batch_size=args["batch_size"], backend="pt")
    t0 = time.perf_counter()
    feats = extractor.extract_features(batches=batches, module_names=modules, flatten_acts=False,
                                       output_dir=output_dir, save_in_one_file=output_dir is not None)
    return feats, time.perf_counter() - t0

run(list(range(args["batch_size"])), None)  # warm-up batch (first-call costs, as on our side)
_, seconds = run(None, args["out"])  # read HDF5, transform, forward + hooks, save .npy: end to end
print(json.dumps({
    "versions": {"thingsvision": __import__("thingsvision").__version__, "torch": torch.__version__,
                 "open_clip": open_clip.__version__, "numpy": np.__version__},
    "seconds": seconds, "modules": modules, "output": "float32 .npy per module (output_dir, save_in_one_file)",
}))
'''


def make_stimuli(path: Path, n: int, size: int = 425) -> None:
    """``n`` NSD-sized pictures (the demo's shapes on noisy backgrounds) as an ``imgBrick``."""
    images, _ = make_images(DemoConfig(n_images=n, image_size=size), np.random.default_rng(0))
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1, size, size, 3))


def time_forward(loaded: clip.LoadedModel, pixels: torch.Tensor, batch: int, device: str, dtype: str,
                 fn) -> float:
    """Seconds for ``fn`` over all pixels in batches (after one warm-up batch), synchronised."""
    autocast = torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype)) if dtype != "float32" else None
    pixels = pixels.to(device)

    def run(x: torch.Tensor) -> None:
        with torch.no_grad():
            if autocast is None:
                fn(x)
            else:
                with autocast:
                    fn(x)

    run(pixels[:batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for a in range(0, len(pixels), batch):
        run(pixels[a : a + batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def store_bytes(path: Path) -> tuple[int, int]:
    """(bytes on disk, uncompressed bytes of every array) of a Zarr store."""
    disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    group = zarr.open_group(path, mode="r")
    raw = 0
    for _, arr in group.arrays():
        raw += arr.nbytes
    for _, sub in group.groups():
        raw += sum(arr.nbytes for _, arr in sub.arrays())
    return disk, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-L-14")
    ap.add_argument("--layers", default="8,16,24")
    ap.add_argument("--tokens", default="all")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-rows", type=int, default=8, help="several shards, so writes can overlap compute")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--loader-workers", type=int, default=None)
    ap.add_argument("--tv-python", default="/tmp/tv-venv/bin/python", help="python of the THINGSvision venv")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    device = str(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    hdf5 = work / "nsd_stimuli.hdf5"
    make_stimuli(hdf5, args.images)

    torch.manual_seed(0)
    weights = work / "random-weights.pt"
    torch.save(clip.load_model(args.model, "none").model.state_dict(), weights)
    loaded = cached_model(args.model, str(weights), device)  # what extract_clip will reuse
    layers = clip.parse_layers(args.layers, loaded.n_blocks)
    with h5py.File(hdf5, "r") as f:
        pixels = clip.preprocess_batch(loaded, f["imgBrick"][()])
    n = args.images

    forward_s = time_forward(loaded, pixels, args.batch_size, device, dtype, loaded.model.encode_image)
    layers_s = time_forward(loaded, pixels, args.batch_size, device, dtype,
                            lambda x: clip.encode_layers(loaded, x, layers, clip.TokenMode.parse(args.tokens)))

    common = dict(model=args.model, pretrained=str(weights), layers=args.layers, tokens=args.tokens,
                  batch_size=args.batch_size, device=device, dtype=dtype, captions=False,
                  shard_rows=args.shard_rows, loader_workers=args.loader_workers, progress=False)
    warm = f"0-{args.batch_size - 1}"  # one shard: first-call costs, as for forward
    extract_clip(hdf5, work / "warmup.zarr", overwrite=True, images=warm, **common)
    t0 = time.perf_counter()
    out = extract_clip(hdf5, work / "timed.zarr", overwrite=True, **common)
    extract_s = time.perf_counter() - t0
    forward_after_s = time_forward(loaded, pixels, args.batch_size, device, dtype, loaded.model.encode_image)
    disk, raw = store_bytes(out)

    result = {
        "note": "random weights: timing and storage only",
        "device": device if device == "cpu" else torch.cuda.get_device_name(torch.device(device)),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "model": args.model, "layers": args.layers, "tokens": args.tokens, "images": n,
        "batch_size": args.batch_size, "dtype": dtype, "shard_rows": args.shard_rows,
        "forward_images_per_s": 2 * n / (forward_s + forward_after_s),
        "forward_images_per_s_before_after": [n / forward_s, n / forward_after_s],
        "forward_with_layers_images_per_s": n / layers_s,
        "extract_clip_images_per_s": n / extract_s,
        "extract_over_forward": (forward_s + forward_after_s) / 2 / extract_s,
        "bytes_per_image_on_disk": disk / n,
        "bytes_per_image_uncompressed": raw / n,
        "compression_ratio": raw / disk,
        "versions": {"torch": torch.__version__, "zarr": zarr.__version__},
    }

    if Path(args.tv_python).exists():
        tv_out = work / "thingsvision"
        tv_out.mkdir(exist_ok=True)
        config = [p for p in (Path(args.model), clip.MODEL_CONFIG_DIR / f"{args.model}.json") if p.suffix == ".json" and p.is_file()]
        spec = {"model": loaded.name, "config": str(config[0]) if config else None, "weights": str(weights), "hdf5": str(hdf5), "device": device,
                "batch_size": args.batch_size, "blocks": [b for layer in layers for b in layer.blocks],
                "threads": torch.get_num_threads(), "out": str(tv_out)}
        proc = subprocess.run([args.tv_python, "-c", THINGSVISION_SCRIPT, json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            result["thingsvision"] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            tv = json.loads(proc.stdout.strip().splitlines()[-1])
            tv["images_per_s"] = n / tv["seconds"]
            tv["bytes_per_image_on_disk"] = sum(p.stat().st_size for p in tv_out.rglob("*.npy")) / n
            result["thingsvision"] = tv
            result["extract_clip_over_thingsvision"] = result["extract_clip_images_per_s"] / tv["images_per_s"]
    else:
        result["thingsvision"] = {"skipped": f"{args.tv_python} not found; see the module docstring to set it up"}

    emit(result, args.out)


if __name__ == "__main__":
    main()
