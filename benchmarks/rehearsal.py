"""Rehearsal at NSD shapes: the real pipeline, stage by stage, on an NSD look-alike of real size.

The look-alike is :func:`pipeline.demo.nsd.make_demo` with a bigger :class:`DemoConfig`: 81x104x83
func1pt8mm volumes with 15,196 nsdgeneral voxels, 750 trials per session, 425-px stimuli, one
subject with ``--sessions`` sessions and an image pool of ``--images`` (default: the fewest the
design needs, ``sessions * 750 / 3``), a tenth of them shared (test) images as in NSD. Then, each
stage in its own process, from a working folder without params.yaml (so every setting is the
command's real default unless given here):

1. ``prepare-fmri``;
2. ``extract-clip``, ViT-L/14 at 224 px (random weights unless ``--pretrained``), layers
   8,16,24,11-20:mean, all tokens, captions;
3. ``fit-adapters`` ridge (targets image_embeds, layers/11-20_mean, layers/24) and mclip (its
   default sizes, ``--epochs`` epochs) on the CPU or GPU;
4. ``decode`` retrieval for every test image, and Stable unCLIP for ``--decode-images`` test
   images with ``--steps`` steps: the architecture of stable-diffusion-2-1-unclip-small with
   random weights (benchmarks/unclip_small.py), unless ``--unclip-model`` names real weights;
5. ``evaluate`` (metrics whose weights are absent are reported unavailable), and the metric
   networks' real architectures with RANDOM weights on the test images at 768 px
   (benchmarks/evaluate.py): timings only, no metric value is reported.

Per stage it prints wall time, peak RSS (the stage process's ``ru_maxrss``), bytes written (size
of the stage's outputs) and a linear extrapolation to full NSD (73k images; 40 sessions x 8 subjects,
an upper bound: subjects 3, 4, 6, 8 have fewer; 9000 train / 1000 test images per subject; mclip's
default 50 epochs; 20 unCLIP steps): each stage's time and bytes times the ratio of its unit (sessions,
images, train rows x epochs, test images; retrieval decode: the cached images it scans), per
subject where it runs per subject. Linear is a lower bound for ridge (its decompositions grow
with the square of the training rows) and about exact for extraction; at tiny sizes process start-up
(~5 s of imports) dominates and the extrapolation means nothing.

    python benchmarks/rehearsal.py [--sessions 1] [--images N] [--trials 750] [--device auto]
        [--pretrained TAG] [--epochs 1] [--decode-images 1] [--steps 2] [--small-models]
        [--workdir DIR] [--out result.json]

``--small-models`` swaps in the demo's tiny ViT, demo-sized mclip, test-sized unCLIP components and
AlexNet only, to check the plumbing in a minute (``--sessions 1 --trials 120 --images 40``).
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
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import emit  # noqa: E402  (benchmarks/ is the script's folder)

FULL = {"images": 73_000, "sessions": 40 * 8, "subjects": 8, "train": 9_000, "test": 1_000, "epochs": 50, "steps": 20}
VOLUME = (81, 104, 83)
BRAIN_SCALE = 0.44  # 15,196 nsdgeneral voxels at VOLUME


def du(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths if p.exists() for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def run_stage(name: str, argv: list[str], workdir: Path, outputs: list[str], factor: float | None,
              bytes_factor: float | None = None, env: dict | None = None) -> dict:
    """Run one stage in its own process; its wall time, peak RSS (wait4) and output size."""
    log = workdir / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    print(f"[rehearsal] {name}: {' '.join(argv[1:])[:160]}", file=sys.stderr, flush=True)
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); {log}:\n" + "\n".join(tail))
    written = du(*(workdir / o for o in outputs))
    result = {"stage": name, "wall_s": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "bytes_written": written}
    if factor is not None:
        bf = factor if bytes_factor is None else bytes_factor
        result.update(full_nsd_factor=round(factor, 1), full_nsd_wall_h=round(seconds * factor / 3600, 2),
                      full_nsd_bytes=int(written * bf))
    print(f"[rehearsal] {name}: {seconds:.1f} s, peak RSS {usage.ru_maxrss / 1e6:.2f} GB, wrote {written / 1e9:.3f} GB",
          file=sys.stderr, flush=True)
    return result


def python(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n{code}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--trials", type=int, default=750, help="trials per session (NSD: 750)")
    parser.add_argument("--images", type=int, default=None, help="image pool (default: sessions * trials / 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pretrained", default="none", help="open_clip tag or checkpoint for ViT-L-14 (default: random)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--decode-images", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--unclip-model", default=None, help="real unCLIP weights (default: random-weight -small architecture)")
    parser.add_argument("--small-models", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (the unCLIP folder is reused)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="rehearsal-"))).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}

    from pipeline.demo.nsd import DemoConfig

    n10k = args.sessions * args.trials // 3
    cfg = DemoConfig(
        n_images=args.images or n10k, image_size=425, subjects=(1,), sessions=(args.sessions,), trials_per_session=args.trials,
        n_shared=max(2, n10k // 10), volume=VOLUME, brain_scale=BRAIN_SCALE, nifti_subjects=(),
    )
    n_test, n_train = cfg.n_shared, n10k - cfg.n_shared
    small = args.small_models
    detail, last = ("layers/2-4_mean", "layers/6") if small else ("layers/11-20_mean", "layers/24")
    if small:  # demo-sized mclip through a params.yaml of the working folder (read by fit-adapters only)
        (workdir / "params.yaml").write_text(json.dumps({"fit_adapters": {"mclip": {"width": 64, "depth": 1, "token_rank": 8}}}))
    cli = [sys.executable, str(REPO / "cli.py")]
    subjects = FULL["subjects"]
    stages = []

    stages.append(run_stage("make-demo (NSD look-alike)", python(
        "from pipeline.demo.nsd import DemoConfig, make_demo\n"
        f"make_demo('nsd', DemoConfig(**{json.dumps({k: v for k, v in asdict(cfg).items()})}))"),
        workdir, ["nsd"], None, env=env))
    stages.append(run_stage("prepare-fmri", cli + ["prepare-fmri", "--subject", "1", "--nsd-root", "nsd",
                            "--out", "cache/fmri/subj01.zarr"], workdir, ["cache/fmri"], FULL["sessions"] / args.sessions, env=env))
    clip_args = (["--model", "nsd-tiny-vit", "--pretrained", "nsd/demo/nsd-tiny-vit.safetensors", "--layers", "2,4,6,2-4:mean"]
                 if small else ["--model", "ViT-L-14", "--pretrained", args.pretrained, "--layers", "8,16,24,11-20:mean"])
    stages.append(run_stage("extract-clip", cli + ["extract-clip", "--stimuli", "nsd", "--out", "cache/clip/rehearsal.zarr",
                            *clip_args, "--captions", "--device", device], workdir, ["cache/clip"],
                            FULL["images"] / cfg.n_images, env=env))
    fit = cli + ["fit-adapters", "--fmri", "cache/fmri/subj01.zarr", "--clip", "cache/clip/rehearsal.zarr", "--device", device]
    rows = FULL["train"] * subjects / n_train
    stages.append(run_stage("fit-adapters ridge", fit + ["--method", "ridge", "--targets", f"image_embeds,{detail},{last}",
                            "--out", "runs/ridge"], workdir, ["runs/ridge"], rows, bytes_factor=subjects, env=env))
    stages.append(run_stage(f"fit-adapters mclip ({args.epochs} epochs)", fit + [
        "--method", "mclip", "--targets", f"{detail},image_embeds,text_embeds", "--epochs", str(args.epochs),
        "--out", "runs/mclip"], workdir, ["runs/mclip"], rows * FULL["epochs"] / args.epochs, bytes_factor=subjects, env=env))
    tests = FULL["test"] * subjects / n_test
    stages.append(run_stage("decode retrieval", cli + ["decode", "--run", "runs/ridge", "--nsd-root", "nsd", "--device", device],
                            workdir, ["runs/ridge/recon", "runs/ridge/recon_grid.png"],
                            subjects * FULL["images"] / cfg.n_images, bytes_factor=tests, env=env))  # reads the whole bank once

    model = args.unclip_model
    if model is None:
        model = str(workdir / ("unclip-tiny" if small else "unclip-small"))
        stages.append(run_stage("build unCLIP (random weights, -small architecture)" if not small else "build unCLIP (tiny)",
                                python(f"import unclip_small; unclip_small.build({model!r}, tiny={small})"),
                                workdir, [Path(model).name], None, env=env))
    k = min(args.decode_images, n_test)
    stages.append(run_stage(f"decode unCLIP ({k} images, {args.steps} steps)", python(
        "import numpy as np, zarr\nfrom pipeline.decoding import decode\n"
        "preds = zarr.open_group('runs/mclip/predictions.zarr', mode='r')\n"
        f"emb, ids = preds['test/image_embeds'][:{k}], preds['test/image_ids'][:{k}]\n"
        f"pipe = decode.load_unclip({model!r}, device={device!r})\n"
        f"images = decode.unclip_decode(pipe, emb, ids, steps={args.steps}, batch_size=2)\n"
        "decode.write_reconstructions('runs/mclip/recon_unclip', ids, images)"),
        workdir, ["runs/mclip/recon_unclip"], FULL["test"] * subjects / k * FULL["steps"] / args.steps,
        bytes_factor=FULL["test"] * subjects / k, env=env))
    stages.append(run_stage("evaluate", cli + ["evaluate", "--run", "runs/ridge", "--nsd-root", "nsd", "--device", device],
                            workdir, ["runs/ridge/metrics.json", "runs/ridge/plots"], tests, env=env))
    stages.append(run_stage("metric networks (random weights, 768 px; timings only)", [
        sys.executable, str(REPO / "benchmarks/evaluate.py"), "--images", str(n_test), "--size", "768",
        "--networks", "alexnet" if small else "all", "--device", device, "--out", "logs/metric_networks.json"],
        workdir, [], tests, env=env))

    fmri = json.loads((workdir / "cache/fmri/subj01.zarr/zarr.json").read_text())["attributes"]
    result = {
        "benchmark": "rehearsal at NSD shapes", "small_models": small, "workdir": str(workdir),
        "shapes": {"volume": list(VOLUME), "nsdgeneral_voxels": None, "sessions": args.sessions,
                   "trials_per_session": args.trials, "images": cfg.n_images, "train_images": n_train, "test_images": n_test,
                   "stimulus_px": 425, "clip": "nsd-tiny-vit" if small else f"ViT-L-14 ({args.pretrained})"},
        "full_nsd": FULL, "stages": stages,
        "total_wall_s": round(sum(s["wall_s"] for s in stages), 1),
        "total_full_nsd_wall_h": round(sum(s.get("full_nsd_wall_h", 0) for s in stages), 1),
        "device": device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "note": "random weights everywhere unless --pretrained/--unclip-model: timings, memory and sizes only",
    }
    import zarr

    result["shapes"]["nsdgeneral_voxels"] = int(zarr.open_group(workdir / "cache/fmri/subj01.zarr", mode="r")["train/betas"].shape[1])
    result["shapes"]["fmri_sessions"] = fmri.get("sessions")
    emit(result, args.out)


if __name__ == "__main__":
    main()
