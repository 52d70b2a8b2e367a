"""This project's ridge vs himalaya ``RidgeCV`` and scikit-learn ``RidgeCV`` on one synthetic problem.

    .venv/bin/python benchmarks/ridge.py                       # default: a few minutes on 2 cores
    .venv/bin/python benchmarks/ridge.py --channels 1024       # the 4000 x 2000 -> 257 x 1024 problem

A planted low-rank problem (betas X (n, V); targets (n, tokens, channels) stored as a float16 Zarr
array like the CLIP cache, every image shown ``--repeats`` times) is written to a work folder. Each
solver then runs in its own process (so peak RSS is its own), with the same thread count, the same
alpha grid and the same grouped folds:

- ``ours_full``: :class:`RidgeAdapter`, per-target alphas, streaming the whole target array from Zarr
  (the out-of-core claim: peak RSS vs the size of the target array). With ``--cache-chunking rows``
  (the CLIP cache's layout) its fit time includes staging the rows once into column-block chunks;
- on the first ``--ref-columns`` columns only (held in RAM, as the references need):
  ``ours_target`` vs ``himalaya`` (``RidgeCV``, per-target alphas, R^2 scoring, torch backend) and
  ``ours_array`` vs ``sklearn`` (``RidgeCV(cv=folds)``: one alpha for all columns).

Printed JSON: wall time and peak RSS per solver, test R^2 (equal accuracy), and agreement of the
chosen alphas and of the test predictions between each pair. For ours, ``matmul_gflop`` (the solver's
matrix products, counted from the shapes), the float32 matrix-product rate measured in the same process
(``gemm_gflops_per_s``) and the fraction of that rate the fit reached (``fraction_of_gemm_rate``, a lower
bound: eigendecompositions and data handling are in the fit time but not in the count).
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

SOLVERS = ("ours_full", "ours_target", "ours_array", "himalaya", "sklearn")
PAIRS = {"ours_target": "himalaya", "ours_array": "sklearn"}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--voxels", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=257)
    p.add_argument("--channels", type=int, default=256, help="1024 for the full 257x1024 problem (~20 min on 2 cores)")
    p.add_argument(
        "--ref-columns", type=int, default=4096, help="columns the in-RAM references (and ours) are compared on"
    )
    p.add_argument("--alphas", type=int, default=10, help="grid size: logspace(1, 5, N)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="trials per image (rows of one image share a fold)")
    p.add_argument("--batch", type=int, default=4096, help="n_targets_batch for ours and himalaya")
    p.add_argument(
        "--cache-chunking",
        choices=("rows", "tokens"),
        default="rows",
        help="rows: chunks hold whole rows, as extract-clip writes them (ours stages the rows once); tokens: split",
    )
    p.add_argument("--backend", default="torch", help="backend of ours and himalaya: torch | torch_cuda")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--workdir", type=Path, default=None, help="kept if given, else a temporary folder")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=SOLVERS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The problem.


def make_problem(args: argparse.Namespace, work: Path) -> dict:
    """Write X, groups, folds and the float16 target arrays; targets are generated in blocks."""
    import zarr

    from pipeline.fitting.adapters.ridge_solvers import grouped_folds
    from pipeline.store import compressor

    rng = np.random.default_rng(args.seed)
    n, n_test, rank = args.n_train, args.n_test, 64
    images = n // args.repeats
    latent = rng.standard_normal((images + n_test, rank)).astype(np.float32)
    groups = np.repeat(np.arange(images), args.repeats)[:n]
    mixing = rng.standard_normal((rank, args.voxels)).astype(np.float32) / np.sqrt(rank)
    z_train, z_test = latent[groups], latent[images:]
    X = z_train @ mixing + rng.standard_normal((n, args.voxels), dtype=np.float32)  # trial noise
    X_test = z_test @ mixing + rng.standard_normal((n_test, args.voxels), dtype=np.float32)
    np.save(work / "X.npy", X)
    np.save(work / "X_test.npy", X_test)
    np.save(work / "groups.npy", groups)
    folds = grouped_folds(groups, args.folds, args.seed)
    np.savez(work / "folds.npz", **{f"val{k}": val for k, (_, val) in enumerate(folds)})

    store = zarr.open_group(work / "targets.zarr", mode="w", zarr_format=3)
    shape, C = (args.tokens, args.channels), args.channels
    chunk_t = max(1, args.batch // C)
    if args.cache_chunking == "rows":  # ~8 MB chunks of whole rows
        chunks = (max(1, 2**23 // (args.tokens * C * 2)), args.tokens, C)
    else:
        chunks = (1024, chunk_t, C)
    kw = dict(dtype="float16", chunks=chunks, compressors=compressor())
    train = store.create_array("train", shape=(n, *shape), **kw)
    test = store.create_array("test", shape=(n_test, *shape), **kw)
    for t0 in range(0, args.tokens, chunk_t):
        t1 = min(t0 + chunk_t, args.tokens)
        block_rng = np.random.default_rng([args.seed, t0])
        cols = (t1 - t0) * C
        snr = np.logspace(-1.5, 0.5, cols).astype(np.float32)[block_rng.permutation(cols)]  # varied difficulty
        loading = block_rng.standard_normal((rank, cols)).astype(np.float32) * snr / np.sqrt(rank)
        for z, arr in ((z_train, train), (z_test, test)):
            Y = z @ loading + block_rng.standard_normal((len(z), cols), dtype=np.float32)
            arr[:, t0:t1] = Y.reshape(len(z), t1 - t0, C).astype(np.float16)
    return {
        "n_train": n, "n_test": n_test, "voxels": args.voxels, "target_shape": list(shape),
        "target_columns": args.tokens * C, "ref_columns": min(args.ref_columns, args.tokens * C),
        "cache_chunks": list(chunks), "repeats_per_image": args.repeats, "folds": args.folds,
        "fold_sizes": [len(v) for _, v in folds],
        "alphas": np.logspace(1, 5, args.alphas).tolist(), "threads": args.threads,
        "target_bytes_float32": n * args.tokens * C * 4, "target_bytes_float16": n * args.tokens * C * 2,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Workers: one solver per process.


def rss_mb() -> float:
    """Current resident set size in MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def r2_columns(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    return 1 - ((Y - P) ** 2).sum(0) / ((Y - Y.mean(0)) ** 2).sum(0)


def worker(args: argparse.Namespace) -> dict:
    import zarr  # threads come from OMP_NUM_THREADS (set by run_worker); torch is imported only if used

    from pipeline.fitting.adapters.ridge import RidgeAdapter

    work = args.workdir
    X, X_test, groups = np.load(work / "X.npy"), np.load(work / "X_test.npy"), np.load(work / "groups.npy")
    vals = list(np.load(work / "folds.npz").values())
    folds = [(np.setdiff1d(np.arange(len(X)), v), v) for v in vals]
    alphas = np.logspace(1, 5, args.alphas)
    store = zarr.open_group(work / "targets.zarr", mode="r")
    ref = min(args.ref_columns, args.tokens * args.channels)
    ref_t = -(-ref // args.channels)  # whole tokens covering the reference columns

    def ref_targets(split: str) -> np.ndarray:
        return store[split][:, :ref_t].reshape(store[split].shape[0], -1)[:, :ref].astype(np.float32)

    if args.worker == "sklearn":
        import sklearn.linear_model  # noqa: F401  (imports count as the baseline, not as the fit)
    else:
        import torch  # noqa: F401
    result: dict = {}
    if args.worker == "ours_full":
        result["rss_before_fit_mb"] = rss_mb()
        start = time.perf_counter()
        model = RidgeAdapter(alphas=alphas, cv=folds, n_targets_batch=args.batch, backend=args.backend)
        model.fit(X, {"t": store["train"]}, groups=groups, out=work / "adapter")
        result["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = []
        for _, axis1, block in model.iter_predict(X_test):  # test R^2 without holding all predictions
            Y = store["test"][:, axis1].reshape(len(X_test), -1).astype(np.float32)
            scores.append(r2_columns(Y, block.reshape(len(Y), -1)))
        result["predict_s"] = time.perf_counter() - start
        result["test_r2_mean"] = float(np.concatenate(scores).mean())
        result["adapter_bytes"] = sum(f.stat().st_size for f in (work / "adapter").iterdir())
    else:
        Y, Y_test = ref_targets("train"), ref_targets("test")
        result["rss_before_fit_mb"] = rss_mb()
        start = time.perf_counter()
        if args.worker.startswith("ours"):
            alpha_per = {"ours_target": "target", "ours_array": "array"}[args.worker]
            model = RidgeAdapter(
                alphas=alphas, cv=folds, alpha_per=alpha_per, n_targets_batch=args.batch, backend=args.backend
            )
            model.fit(X, {"t": Y}, groups=groups)
            chosen = model.alpha("t")
            predict = lambda A: model.predict(A)["t"]  # noqa: E731
        elif args.worker == "himalaya":
            from himalaya.backend import set_backend
            from himalaya.ridge import RidgeCV
            from himalaya.scoring import r2_score

            set_backend(args.backend)
            params = dict(score_func=r2_score, n_targets_batch=args.batch, warn=False)
            model = RidgeCV(alphas=alphas, cv=folds, fit_intercept=True, solver_params=params).fit(X, Y)
            chosen = np.asarray(model.best_alphas_, np.float64)
            predict = lambda A: np.asarray(model.predict(A))  # noqa: E731
        else:
            from sklearn.linear_model import RidgeCV

            model = RidgeCV(alphas=alphas, cv=folds, fit_intercept=True).fit(X, Y)
            chosen = np.full(Y.shape[1], model.alpha_)
            predict = model.predict
        result["fit_s"] = time.perf_counter() - start
        if args.worker.startswith("ours"):  # what bounds the fit: its products' rate against the machine's
            flops = solver_flops(len(X), X.shape[1], Y.shape[1], [len(v) for v in vals], len(alphas))
            result["matmul_gflop"] = flops / 1e9
            result["gemm_gflops_per_s"] = gemm_flops_per_s("cuda" if "cuda" in args.backend else "cpu") / 1e9
            result["fraction_of_gemm_rate"] = flops / result["fit_s"] / 1e9 / result["gemm_gflops_per_s"]
        start = time.perf_counter()
        P = np.asarray(predict(X_test), np.float32).reshape(len(X_test), -1)
        result["predict_s"] = time.perf_counter() - start
        result["test_r2_mean"] = float(r2_columns(Y_test, P).mean())
        np.save(work / f"pred_{args.worker}.npy", P)
        np.save(work / f"alpha_{args.worker}.npy", chosen)
    result["peak_rss_mb"] = peak_rss_mb()
    result["fit_rss_increase_mb"] = result["peak_rss_mb"] - result["rss_before_fit_mb"]
    return result


def solver_flops(n: int, voxels: int, columns: int, val_sizes: list[int], n_alphas: int) -> float:
    """Floating-point operations of the matrix products of :mod:`pipeline.fitting.adapters.ridge_solvers`
    (eigendecompositions not counted): per fold the Gram matrix, ``M``/``B`` and ``A``, then ``M^T Y``
    and one ``A (d Q)`` per alpha; the refit on all rows adds its Gram, ``M``/``B``, ``M^T Y`` and ``B (f Q)``."""
    total = 0.0
    for n_val in val_sizes:
        n_tr = n - n_val
        r = min(n_tr, voxels)
        total += 2 * n_tr * voxels * r * 2 + 2 * n_val * voxels * r  # Gram, M or B, A
        total += 2 * r * n_tr * columns + n_alphas * 2 * n_val * r * columns  # M^T Y, the alphas' A (d Q)
    r = min(n, voxels)
    return total + 2 * n * voxels * r * 2 + 2 * r * n * columns + 2 * voxels * r * columns


def gemm_flops_per_s(device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """The float32 matrix-product rate of ``device`` here (torch, best of ``repeats``): the ceiling of a
    solver made of matrix products."""
    import torch

    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    best = min(_timed(lambda: (a @ b, sync())) for _ in range(repeats + 1))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_worker(args: argparse.Namespace, name: str, work: Path) -> dict:
    env = dict(
        os.environ, **{v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    )
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--workdir", str(work)]  # last --workdir wins
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(work: Path, ours: str, ref: str) -> dict:
    P, R = np.load(work / f"pred_{ours}.npy"), np.load(work / f"pred_{ref}.npy")
    a, b = np.load(work / f"alpha_{ours}.npy"), np.load(work / f"alpha_{ref}.npy")
    scale = R.std(0).mean()
    return {
        "alphas_equal_fraction": float(np.isclose(a, b, rtol=1e-5).mean()),
        "pred_max_abs_diff_over_std": float(np.abs(P - R).max() / scale),
        "pred_rms_diff_over_std": float(np.sqrt(((P - R) ** 2).mean()) / scale),
    }


def main() -> None:
    args = arguments()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ridge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        report = {"problem": make_problem(args, work)}
        report["problem"]["generate_s"] = time.perf_counter() - start
        report["problem"]["note"] = (
            f"ours_full fits all {report['problem']['target_columns']} columns streamed from Zarr; the other "
            f"solvers (and ours_target/ours_array) fit the first {report['problem']['ref_columns']} columns held in RAM"
        )
        solvers = [s for s in args.solvers.split(",") if s]
        report["solvers"] = {name: run_worker(args, name, work) for name in solvers}
        report["agreement"] = {
            f"{ours}_vs_{ref}": agreement(work, ours, ref)
            for ours, ref in PAIRS.items()
            if all("error" not in report["solvers"].get(s, {"error": 1}) for s in (ours, ref))
        }
        full = report["solvers"].get("ours_full", {})
        if "peak_rss_mb" in full:
            full["peak_rss_over_target_float32"] = (
                full["peak_rss_mb"] * 2**20 / report["problem"]["target_bytes_float32"]
            )
        for ours, ref in PAIRS.items():
            if all("fit_s" in report["solvers"].get(s, {}) for s in (ours, ref)):
                report["agreement"][f"{ours}_vs_{ref}"]["speedup_fit"] = (
                    report["solvers"][ref]["fit_s"] / report["solvers"][ours]["fit_s"]
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    emit(report, args.json)


if __name__ == "__main__":
    main()
