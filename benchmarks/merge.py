"""Token reduction for the cache: ``all`` vs ``merge:K`` vs ``grid:g`` (K = g*g tokens) on the demo.

    .venv/bin/python benchmarks/merge.py                      # the demo (tiny ViT, 4x4 patches): ~2 min on 2 cores
    .venv/bin/python benchmarks/merge.py --grid 2 --seeds 5   # more mclip seeds (the demo's test set is small)

Synthetic data: the demo's planted NSD look-alike and its random-weight tiny ViT, so the numbers say
how the reductions compare on one planted problem, not what they do on NSD with real CLIP weights.
For each token mode the same layer (``--layer``, default ``2-4:mean``, the planted detail target's
analogue) is extracted, then:

- bytes per image: the layer's row (float16 tokens, plus int16 sizes for ``merge``) uncompressed,
  and the store's files for that layer on disk (compressed) divided by N;
- ridge: fit subject 1's betas to the reduced layer; top-1 test retrieval of predicted vs true rows
  in that layer's own space (flattened), chance 1 / n_test;
- mclip: the reduced layer as the detail target (``image_embeds`` semantic, demo widths from
  params.yaml); top-1 test retrieval in the detail space and in ``image_embeds`` (the common space
  all modes share), mean over ``--seeds``.
Printed JSON has one entry per mode and a ``winner`` per measure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from report import emit  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layer", default="2-4:mean")
    p.add_argument("--grid", type=int, default=2, help="grid:g, compared with merge:g*g")
    p.add_argument("--seeds", type=int, default=3, help="mclip seeds per mode")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--workdir", type=Path, default=None, help="kept if given, else a temporary folder")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p.parse_args(argv)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: argparse.Namespace, work: Path) -> dict:
    import torch
    import zarr

    from pipeline.data.fmri import prepare_fmri
    from pipeline.demo.nsd import DemoConfig, make_demo
    from pipeline.features.clip import parse_layers
    from pipeline.features.extract import extract_clip
    from pipeline.fitting.fit import fit_adapters

    torch.set_num_threads(1)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["fit_adapters"]
    ridge = params["ridge"]
    mclip = {k: v for k, v in params["mclip"].items() if k != "train"}
    train = {**params["mclip"]["train"], "epochs": args.epochs}
    demo = make_demo(work / "nsd", DemoConfig()) if not (work / "nsd").is_dir() else work / "nsd"
    fmri = work / "subj01.zarr"
    if not fmri.exists():
        prepare_fmri(demo, 1, fmri, progress=False)
    target = f"layers/{parse_layers(args.layer, 6)[0].name}"  # the demo ViT has 6 blocks
    modes = ["all", f"merge:{args.grid ** 2}", f"grid:{args.grid}"]
    result: dict = {"data": "synthetic demo (planted model, random-weight tiny ViT); not real NSD/CLIP",
                    "layer": target, "modes": {}}
    for mode in modes:
        store = work / f"clip_{mode.replace(':', '')}.zarr"
        extract_clip(demo, store, model="nsd-tiny-vit", pretrained=str(demo / "demo/nsd-tiny-vit.safetensors"),
                     layers=args.layer, tokens=mode, captions=False, progress=False, overwrite=True)
        g = zarr.open_group(store, mode="r")
        n = g[target].shape[0]
        arrays = [target] + ([f"{target}__sizes"] if f"{target}__sizes" in g else [])
        row = sum(int(np.prod(g[a].shape[1:])) * g[a].dtype.itemsize for a in arrays)
        disk = sum(folder_bytes(store / a) for a in arrays)
        start = time.perf_counter()
        r = fit_adapters(fmri, store, "ridge", work / "runs" / f"ridge_{mode}", targets=[target], params=ridge,
                         progress=False)["targets"][target]
        ridge_s = time.perf_counter() - start
        detail, embeds = [], []
        for seed in range(args.seeds):
            rep = fit_adapters(fmri, store, "mclip", work / "runs" / f"mclip_{mode}_{seed}",
                               targets=[target, "image_embeds"], params=mclip, train=train, seed=seed,
                               progress=False)["targets"]
            detail.append(rep[target]["top1_retrieval"])
            embeds.append(rep["image_embeds"]["top1_retrieval"])
        result["modes"][mode] = {
            "tokens": int(g[target].shape[1]), "bytes_per_image": row, "disk_bytes_per_image": round(disk / n, 1),
            "ridge_top1_own_space": r["top1_retrieval"], "ridge_pearson_r": r["pearson_r"],
            "mclip_top1_detail_space": float(np.mean(detail)), "mclip_top1_image_embeds": float(np.mean(embeds)),
            "mclip_top1_image_embeds_per_seed": embeds, "chance": r["top1_chance"], "ridge_seconds": round(ridge_s, 2),
        }
    reduced = modes[1:]
    result["winner"] = {
        measure: max(reduced, key=lambda m: result["modes"][m][measure])
        for measure in ("ridge_top1_own_space", "mclip_top1_detail_space", "mclip_top1_image_embeds")
    }
    result["winner"]["bytes_per_image"] = min(reduced, key=lambda m: result["modes"][m]["bytes_per_image"])
    return result


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        emit(run(args, args.workdir), args.json)
        return
    with tempfile.TemporaryDirectory() as tmp:
        emit(run(args, Path(tmp)), args.json)


if __name__ == "__main__":
    main()
