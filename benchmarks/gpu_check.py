"""One prepared command for the day a GPU is lent: every GPU path of the project, timed, in one run.

    python benchmarks/gpu_check.py [--device cuda] [--parts extract,video,...] [--out gpu.json]
    python benchmarks/gpu_check.py --device cpu --quick       # the same code at tiny sizes (< 1 min)

Random weights of the real architectures; only timings, memory and agreement mean anything. Each
part runs in its own process under its own time limit (one hang or failure does not stop the rest)
and reports ``{"ok", "seconds", "error", "peak_gpu_mb", "results"}``; ``peak_gpu_mb`` is
``torch.cuda.max_memory_allocated`` of that part (None on CPU). Parts (limits sum to under 8 min):

- ``extract``: ViT-L/14 fp16 images/s of ``extract_clip`` vs the bare ``encode_image`` forward and
  THINGSvision-style forward hooks on the same blocks (outputs copied to the host), same pixels;
- ``video``: ``extract_video`` on the device over the cc2017 look-alike (its tiny ViT);
- ``ridge``: ``benchmarks/ridge.py`` at NSD shapes, ours vs himalaya on the same backend
  (``torch_cuda`` on a GPU): fit seconds and agreement of the predictions;
- ``train``: mclip and Lite-Mind training steps/s (``benchmarks/train.py``'s ``adapter_steps``);
- ``loss``: the contrastive and token losses of ``pipeline/fitting/adapters/losses.py`` and their
  gradients under bf16 autocast vs float32 (relative differences; the target is <= 1e-4);
- ``unclip``: one 768-px image, 20 steps, through the -small unCLIP architecture (``unclip_small.py``);
- ``reads``: stage-2 read amplification (``benchmarks/reads.py``'s ``run``; skipped where absent).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from report import emit  # noqa: E402  (benchmarks/ is the script's folder)


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def _sync(device: str) -> None:
    import torch

    if _cuda(device):
        torch.cuda.synchronize()


def part_extract(device: str, quick: bool, work: Path) -> dict:
    import h5py
    import torch

    import extract as bench
    from pipeline.features import clip
    from pipeline.features.extract import extract_clip
    from pipeline.features.shards import cached_model

    model, layers, n, batch = ("nsd-tiny-vit", "2,6", 8, 4) if quick else ("ViT-L-14", "8,16,24", 512, 64)
    dtype = "float16" if _cuda(device) else "float32"
    hdf5 = work / "stimuli.hdf5"
    bench.make_stimuli(hdf5, n, 64 if quick else 425)
    torch.manual_seed(0)
    weights = work / "random-weights.pt"
    torch.save(clip.load_model(model, "none").model.state_dict(), weights)
    loaded = cached_model(model, str(weights), device)
    blocks = [b for layer in clip.parse_layers(layers, loaded.n_blocks) for b in layer.blocks]
    with h5py.File(hdf5, "r") as f:
        pixels = clip.preprocess_batch(loaded, f["imgBrick"][()])
    forward_s = bench.time_forward(loaded, pixels, batch, device, dtype, loaded.model.encode_image)

    held: list = []  # THINGSvision's way: forward hooks on the blocks, each output copied to the host
    resblocks = loaded.model.visual.transformer.resblocks
    hooks = [resblocks[b - 1].register_forward_hook(lambda m, i, o: held.append(o.detach().cpu())) for b in blocks]
    try:
        hooks_s = bench.time_forward(loaded, pixels, batch, device, dtype, loaded.model.encode_image)
    finally:
        for h in hooks:
            h.remove()
    common = dict(model=model, pretrained=str(weights), layers=layers, tokens="all", batch_size=batch,
                  device=device, dtype=dtype, captions=False, shard_rows=batch * 2, progress=False)
    extract_clip(hdf5, work / "warmup.zarr", overwrite=True, images=f"0-{batch - 1}", **common)
    t0 = time.perf_counter()
    extract_clip(hdf5, work / "timed.zarr", overwrite=True, **common)
    extract_s = time.perf_counter() - t0
    return {"model": f"{model} (random weights)", "images": n, "batch_size": batch, "dtype": dtype, "layers": layers,
            "forward_images_per_s": n / forward_s, "hooks_images_per_s": n / hooks_s,
            "extract_clip_images_per_s": n / extract_s, "extract_over_forward": forward_s / extract_s,
            "extract_over_hooks": hooks_s / extract_s}


def part_video(device: str, quick: bool, work: Path) -> dict:
    from pipeline.demo.video import DEMO_DESIGN, DemoVideoConfig, make_demo_video
    from pipeline.features.video import extract_video

    root = make_demo_video(work / "cc2017", DemoVideoConfig(subjects=1))
    t0 = time.perf_counter()
    extract_video(root, work / "video.zarr", design=DEMO_DESIGN, model="nsd-tiny-vit",
                  pretrained=str(root / "demo/nsd-tiny-vit.safetensors"), layers="2,6,6:proj", frame_size=32,
                  device=device, progress=False)
    return {"seconds_extract_video": time.perf_counter() - t0, "model": "nsd-tiny-vit (the look-alike's)"}


def part_ridge(device: str, quick: bool, work: Path) -> dict:
    backend = "torch_cuda" if _cuda(device) else "torch"
    sizes = (["--n-train", "60", "--n-test", "12", "--voxels", "40", "--tokens", "2", "--channels", "8",
              "--ref-columns", "16", "--alphas", "3", "--folds", "2"] if quick else
             ["--n-train", "9000", "--n-test", "1000", "--voxels", "15724", "--tokens", "257", "--channels", "16",
              "--ref-columns", "4112", "--alphas", "8", "--repeats", "1"])
    cmd = [sys.executable, str(HERE / "ridge.py"), *sizes, "--solvers", "ours_target,himalaya",
           "--backend", backend, "--json", str(work / "ridge.json")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    report = json.loads((work / "ridge.json").read_text())
    errors = {k: v["error"] for k, v in report["solvers"].items() if "error" in v}
    if errors:
        raise RuntimeError(f"ridge solvers failed: {errors}")
    return {"backend": backend, **report}


def part_train(device: str, quick: bool, work: Path) -> dict:
    import torch

    import train as bench

    z, images, batch, steps = (bench.SMALL, 32, 8, 2) if quick else (bench.REAL, 512, 64, 10)
    return {m: bench.adapter_steps(m, z, torch.device(device), images, batch, steps) for m in ("mclip", "litemind")}


def _relative(a, b) -> float:
    import torch

    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def part_loss(device: str, quick: bool, work: Path) -> dict:
    """Each loss and its gradient under bf16 autocast vs float32, at Lite-Mind's temperature e^-8 on
    B = 64 flattened 257x768 targets, and on targets that are small perturbations of one vector."""
    import torch

    from pipeline.fitting.adapters import losses

    batch, shape = (8, (5, 16)) if quick else (64, (257, 768))
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(batch, *shape, generator=gen)
    cases = {"random": base, "near_duplicates": base[:1] + 0.01 * base}
    functions: dict[str, Callable] = {
        "info_nce": lambda p, t: losses.info_nce(p, t, temperature=float(torch.exp(torch.tensor(-8.0))), symmetric=False),
        "info_nce_symmetric": lambda p, t: losses.info_nce(p, t, temperature=0.05),
        "token_cosine": losses.token_cosine,
        "mse": losses.mse,
    }
    out = {}
    dev = torch.device(device)
    for case, true in cases.items():
        true = true.to(dev)
        pred0 = true + 0.5 * torch.randn(true.shape, generator=gen).to(dev)
        for name, fn in functions.items():
            results = {}
            for mode in ("float32", "bfloat16"):  # the same float32 inputs, with and without autocast
                pred = pred0.clone().requires_grad_(True)
                with torch.autocast(dev.type, torch.bfloat16, enabled=mode == "bfloat16"):
                    loss = fn(pred, true)
                loss.backward()
                results[mode] = (loss.detach(), pred.grad)
            (l32, g32), (l16, g16) = results["float32"], results["bfloat16"]
            out[f"{case}/{name}"] = {"loss_fp32": float(l32), "loss_bf16": float(l16),
                                     "loss_rel_diff": _relative(l16.reshape(1), l32.reshape(1)),
                                     "grad_rel_diff": _relative(g16, g32),
                                     "grad_cosine": float(torch.nn.functional.cosine_similarity(
                                         g16.flatten().double(), g32.flatten().double(), dim=0))}
    worst = max(max(v["loss_rel_diff"], v["grad_rel_diff"]) for v in out.values())
    return {"batch": batch, "target_shape": list(shape), "cases": out, "worst_rel_diff": worst,
            "within_1e-4": worst <= 1e-4}


def part_unclip(device: str, quick: bool, work: Path) -> dict:
    import numpy as np
    import torch

    import unclip_small
    from pipeline.decoding.decode import load_unclip, unclip_decode

    folder = unclip_small.build(work / "unclip", tiny=quick)
    pipe = load_unclip(folder, device=device, local_files_only=True)
    size, steps = (64, 2) if quick else (768, 20)
    dim = int(pipe.image_normalizer.mean.shape[-1])
    embeds = np.random.default_rng(0).standard_normal((1, dim)).astype(np.float32)
    unclip_decode(pipe, embeds, [0], steps=1, height=size, width=size)  # warm-up: first-call costs
    _sync(device)
    t0 = time.perf_counter()
    image = unclip_decode(pipe, embeds, [0], steps=steps, height=size, width=size)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"architecture": "tiny" if quick else "stable-diffusion-2-1-unclip-small (random weights)",
            "size": size, "steps": steps, "seconds_per_image": seconds, "image_shape": list(image.shape),
            "dtype": str(next(pipe.unet.parameters()).dtype).removeprefix("torch.")}


def part_reads(device: str, quick: bool, work: Path) -> dict:
    if not (HERE / "reads.py").is_file():
        return {"skipped": "benchmarks/reads.py is not in this tree"}
    import reads

    sizes = dict(rows=2048, wanted=64, tokens=4, channels=4, shard_rows=256) if quick else {}
    return reads.run(folder=work / "reads", **sizes)


# part -> (function, time limit in seconds on one H100)
PARTS: dict[str, tuple[Callable[[str, bool, Path], dict], int]] = {
    "extract": (part_extract, 90),
    "video": (part_video, 30),
    "ridge": (part_ridge, 90),
    "train": (part_train, 60),
    "loss": (part_loss, 20),
    "unclip": (part_unclip, 90),
    "reads": (part_reads, 75),
}


def child(name: str, device: str, quick: bool) -> dict:
    """Run one part in this process; its results plus the peak GPU memory it allocated."""
    import torch

    if _cuda(device):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as work:
        results = PARTS[name][0](device, quick, Path(work))
    peak = torch.cuda.max_memory_allocated() / 2**20 if _cuda(device) else None
    return {"results": results, "peak_gpu_mb": peak}


def run_part(name: str, device: str, quick: bool, limit: float) -> dict:
    """One part in a subprocess under ``limit`` seconds: ``{ok, seconds, error, peak_gpu_mb, results}``."""
    cmd = [sys.executable, __file__, "--child", name, "--device", device, *(["--quick"] if quick else [])]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": f"timed out after {limit:.0f} s",
                "peak_gpu_mb": None, "results": None}
    seconds = time.perf_counter() - t0
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {"ok": False, "seconds": seconds, "error": tail[0], "peak_gpu_mb": None, "results": None}
    found = json.loads(lines[-1])
    return {"ok": True, "seconds": seconds, "error": None, **found}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run of the same code)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.device, args.quick)))
        return
    names = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    import torch

    result = {"device": torch.cuda.get_device_name() if _cuda(args.device) and torch.cuda.is_available() else args.device,
              "quick": args.quick, "python": platform.python_version(), "torch": torch.__version__,
              "note": "random weights: timings, memory and agreement only", "parts": {}}
    t0 = time.perf_counter()
    for name in names:
        limit = PARTS[name][1] * (4 if args.quick else 1)  # tiny sizes, but a slow shared CPU
        result["parts"][name] = run_part(name, args.device, args.quick, limit)
        print(f"{name}: {'ok' if result['parts'][name]['ok'] else result['parts'][name]['error']}", file=sys.stderr)
    result["seconds"] = time.perf_counter() - t0
    result["ok"] = all(p["ok"] for p in result["parts"].values())
    emit(result, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
