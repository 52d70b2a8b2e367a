"""analyze-layers at subj01 size on synthetic stores: wall time and peak memory, per layer and in total.

    .venv/bin/python benchmarks/analyze_layers.py                       # 2 of 24 layers, extrapolated
    .venv/bin/python benchmarks/analyze_layers.py --measure-layers 24   # the full run (GPU: minutes)
    .venv/bin/python benchmarks/analyze_layers.py --voxels 2000 --n-train 900 --n-test 100   # quick check
    .venv/bin/python benchmarks/analyze_layers.py --features flatten --tokens 257 --width 256 \
        --voxels 2000 --n-train 900 --n-test 100 --layers 1 --measure-layers 1 --baseline   # flatten memory

Writes, in a work folder, what prepare-fmri and extract-clip would give for NSD subj01 (15,724
nsdgeneral voxels; ~9,000 train and 1,000 test images, averaged over 3 trials; the single trials
in a second, per-trial store for the noise ceiling; prf-visualrois and floc-* labels; a CLIP cache
with ``--tokens mean`` layers of width 1024, ViT-L/14's). Data are low-rank Gaussian (content does
not change the cost). The stage then runs in a child process (its own peak RSS) over
``--measure-layers`` layers; the total for ``--layers`` layers is extrapolated linearly from the
per-layer time (the layer loop is the only part whose cost grows with the number of layers; the
(test x test) Gram matrices and RDMs it keeps add ~12 MB per layer at 1,000 test images).

``--features flatten`` writes all-token layers (``--tokens`` x ``--width``, one-row chunks in
1,024-row shards, as extract-clip writes them) and ``--baseline`` also runs, in its own child
process, the direct computation on the (images x tokens*width) matrix (read, z-score, ``encode``,
RDM, centred Gram: the stage's path before its Gram-matrix form) on layer 1, for its peak RSS.

Printed JSON: sizes, setup (store reading, ROI RDMs, noise ceiling) and per-layer seconds, peak
RSS, and the extrapolation, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import emit  # noqa: E402  (benchmarks/ is the script's folder)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--voxels", type=int, default=15724)
    p.add_argument("--n-train", type=int, default=9000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="trials per image in the per-trial store")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--features", choices=("mean", "flatten"), default="mean", help="what analyze-layers reads")
    p.add_argument("--tokens", type=int, default=257, help="tokens per layer with --features flatten")
    p.add_argument("--baseline", action="store_true", help="also measure the direct flatten computation on layer 1")
    p.add_argument("--layers", type=int, default=24, help="layers of the real run (extrapolation target)")
    p.add_argument("--measure-layers", type=int, default=2, help="layers actually analysed here")
    p.add_argument("--backend", default="auto", help="auto | torch | torch_cuda | numpy")
    p.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (default: all cores)")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-direct", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_stores(a: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The fMRI store (averaged), the per-trial store and the CLIP cache, in the project's layouts."""
    from pipeline.features.cache import DONE
    from pipeline.store import atomic_store, compressor

    rng = np.random.default_rng(a.seed)
    n_img, rank = a.n_train + a.n_test, 64
    latent = rng.standard_normal((n_img, rank)).astype(np.float32)
    loadings = rng.standard_normal((rank, a.voxels)).astype(np.float32) / np.sqrt(rank)
    ids = np.sort(rng.choice(73000, n_img, replace=False))
    test = np.zeros(n_img, bool)
    test[rng.choice(n_img, a.n_test, replace=False)] = True
    labels = {"prf-visualrois": (0, 0.08, 7), "floc-faces": (0.08, 0.11, 5), "floc-bodies": (0.11, 0.14, 4),
              "floc-places": (0.14, 0.16, 3), "floc-words": (0.16, 0.18, 5)}
    paths = {"fmri": work / "subj01.zarr", "trials": work / "subj01_trials.zarr", "clip": work / "clip.zarr"}

    def arr(group, name, data):
        rows = max(1, min(len(data), (16 << 20) // max(1, data[0].nbytes)))
        group.create_array(name, data=data, chunks=(rows, *data.shape[1:]), compressors=[compressor()])

    for kind in ("fmri", "trials"):
        with atomic_store(paths[kind]) as root:
            for split, sel in (("train", ~test), ("test", test)):
                img = np.flatnonzero(sel)
                if kind == "fmri":
                    rows, noise = img, 1 / np.sqrt(a.repeats)
                    arr(root, f"{split}/n_repeats", np.full(len(img), a.repeats, np.int64))
                else:
                    rows, noise = np.repeat(img, a.repeats), 1.0
                    arr(root, f"{split}/trial_ids", np.arange(len(rows), dtype=np.int64))
                betas = np.empty((len(rows), a.voxels), np.float32)
                for s in range(0, len(rows), 2048):  # bounded temporaries
                    part = rows[s : s + 2048]
                    betas[s : s + len(part)] = latent[part] @ loadings + noise * rng.standard_normal(
                        (len(part), a.voxels), dtype=np.float32)
                arr(root, f"{split}/betas", betas)
                arr(root, f"{split}/image_ids", ids[rows])
                del betas
            for name, (lo, hi, n_labels) in labels.items():
                lab = np.zeros(a.voxels, np.int32)
                span = np.arange(int(lo * a.voxels), int(hi * a.voxels))
                lab[span] = 1 + np.arange(len(span)) * n_labels // max(1, len(span))
                arr(root, f"voxels/{name}", lab)
                root[f"voxels/{name}"].attrs["labels"] = {str(k): f"{name}-{k}" for k in range(1, n_labels + 1)}
            arr(root, "voxels/nsdgeneral", np.ones(a.voxels, np.int32))
            root["voxels/nsdgeneral"].attrs["labels"] = {"1": "nsdgeneral"}  # an ROI label array, as prepare-fmri writes
            root.attrs.update({"subject": 1, "zscore": "session", "rois": ["nsdgeneral", *labels]})

    n_rows = 73000
    flat = a.features == "flatten"
    tokens, chunk, shard = (a.tokens, 1, 1024) if flat else (1, 512, 4096)
    with atomic_store(paths["clip"]) as root:
        for k in range(1, a.measure_layers + 1):
            row = (tokens, a.width)
            layer = root.create_array(f"layers/{k}", shape=(n_rows, *row), dtype="float16", fill_value=0,
                                      chunks=(chunk, *row), shards=(shard, *row), compressors=[compressor()])
            mix = rng.standard_normal((rank, tokens * a.width)).astype(np.float32)
            for lo in range(0, n_rows, shard):  # one shard in memory at a time
                inside = np.flatnonzero((ids >= lo) & (ids < lo + shard))
                if not len(inside):
                    continue
                full = np.zeros((min(shard, n_rows - lo), *row), np.float16)
                full[ids[inside] - lo] = (latent[inside] @ mix + k * rng.standard_normal(
                    (len(inside), tokens * a.width), dtype=np.float32)).reshape(-1, *row)
                layer[lo : lo + len(full)] = full
        root.create_array("image_embeds", shape=(n_rows, 8), dtype="float32", fill_value=0, chunks=(4096, 8))
        done = root.create_array(DONE, shape=(-(-n_rows // 4096),), dtype=bool, chunks=(1,), fill_value=True)
        done.attrs["shard_rows"] = 4096
        root.attrs.update({"settings": {"synthetic": True}, "tokens": "all" if flat else "mean", "model": "synthetic",
                           "layers": {str(k): {"blocks": [k], "aggregate": None} for k in range(1, a.measure_layers + 1)}})
    return paths


def child(a: argparse.Namespace) -> None:
    """Run the stage on the stores in ``a.work``; print timings (the parent reads our RSS)."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from pipeline.analysis import alignment, inputs

    marks = []
    hook = "flatten_grams" if a.features == "flatten" else "layer_features"  # called once per layer
    original = getattr(inputs, hook)

    def timed(*args, **kwargs):
        marks.append(time.perf_counter())
        return original(*args, **kwargs)

    setattr(inputs, hook, timed)
    start = time.perf_counter()
    result = alignment.analyze_layers(a.work / "subj01.zarr", a.work / "clip.zarr", a.work / "out",
                                      fmri_trials=a.work / "subj01_trials.zarr", progress=False,
                                      features=a.features, encoding={"backend": a.backend})
    total = time.perf_counter() - start
    per_layer = np.diff(marks).tolist() + [None]
    print(json.dumps({"total_s": total, "setup_s": marks[0] - start, "per_layer_s": per_layer, "n_rois": len(result["rois"]),
                      "device": "cuda" if torch.cuda.is_available() and a.backend in ("auto", "torch_cuda") else "cpu"}))


def child_direct(a: argparse.Namespace) -> None:
    """Layer 1 the direct way, on the (images x tokens*width) matrix; print seconds and own peak RSS."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import zarr

    from pipeline.analysis import encoding, inputs, rsa

    start = time.perf_counter()
    fmri = zarr.open_group(a.work / "subj01.zarr", mode="r")
    train, test = (inputs.load_split(fmri, a.work, s) for s in ("train", "test"))
    rows = np.union1d(train.image_ids, test.image_ids)
    clip = inputs.open_clip_cache(a.work / "clip.zarr", rows)
    feats = inputs.layer_features(clip, "1", rows, "flatten", "all")
    pos_train, pos_test = np.searchsorted(rows, train.image_ids), np.searchsorted(rows, test.image_ids)
    X_train, X_test = encoding.standardize(feats[pos_train], feats[pos_test])
    encoding.encode(X_train, train.betas, X_test, train.image_ids, encoding.EncodingConfig(backend=a.backend))
    rsa.rdm(feats[pos_test]), rsa.centered_gram(feats[pos_test])
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def run_child(a: argparse.Namespace, work: Path, flag: str) -> dict:
    cmd = [sys.executable, __file__, flag, "--work", str(work), "--backend", a.backend, "--features", a.features,
           "--measure-layers", str(a.measure_layers)] + (["--threads", str(a.threads)] if a.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    a = arguments(argv)
    if a.child or a.child_direct:
        (child if a.child else child_direct)(a)
        return
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        write_stores(a, work)
        written = time.perf_counter() - t0
        timing = run_child(a, work, "--child")
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # before any other child
        direct = run_child(a, work, "--child-direct") if a.baseline and a.features == "flatten" else None
        # layer k's time = start of layer k+1 - start of layer k; the last layer is in the tail with CKA and outputs
        layers = [t for t in timing["per_layer_s"] if t is not None]
        tail = timing["total_s"] - timing["setup_s"] - sum(layers)  # last layer + CKA + plots + writing
        per_layer = float(np.mean(layers)) if layers else tail
        outputs_s = max(0.0, tail - per_layer)
        emit({
            "benchmark": "analyze_layers",
            "sizes": {"voxels": a.voxels, "n_train": a.n_train, "n_test": a.n_test, "width": a.width,
                      "features": "flatten (tokens: all)" if a.features == "flatten" else "mean (tokens: mean)",
                      "tokens": a.tokens if a.features == "flatten" else 1, "trials_per_image": a.repeats},
            "device": timing["device"], "threads": a.threads or os.cpu_count(),
            "stores_written_s": round(written, 1),
            "measured": {"layers": a.measure_layers, "total_s": round(timing["total_s"], 1),
                         "setup_s": round(timing["setup_s"], 1), "per_layer_s": round(per_layer, 1),
                         "outputs_s": round(outputs_s, 1), "peak_rss_gb": round(peak_gb, 2), "n_rois": timing["n_rois"]},
            "extrapolated": {"layers": a.layers, "note": "linear in layers from the measured per-layer time; "
                             "peak RSS + ~12 MB per extra layer (Gram matrix + RDM)",
                             "total_s": round(timing["setup_s"] + a.layers * per_layer + outputs_s, 1),
                             "peak_rss_gb": round(peak_gb + (a.layers - a.measure_layers) * 12e-3, 2)},
            "direct_baseline": None if direct is None else {
                "what": "layer 1 read, z-scored, encode() on the feature matrix, RDM and centred Gram (the stage's "
                        "flatten path before its Gram-matrix form)",
                "seconds": round(direct["seconds"], 1), "peak_rss_gb": round(direct["peak_rss_gb"], 2)},
        }, a.out)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
