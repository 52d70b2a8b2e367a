"""Wall time and peak memory of the MindEye2 image metrics on synthetic images at real sizes.

Ground truth is (N, 425, 425, 3) uint8 like NSD's stimuli, reconstructions (N, S, S, 3) uint8 like
unCLIP's 768-px output; both are generated batch by batch (as evaluate reads PNGs) and scored
with :func:`pipeline.evaluation.metrics.evaluate`. The feature networks are the real
architectures with RANDOM weights: the numbers this prints are timings and memory only, the
metric values are discarded and never printed.

    python benchmarks/evaluate.py [--images 1000] [--size 768] [--networks alexnet,inception_v3,...|none]
                                  [--batch-size 32] [--device cpu] [--out result.json]

Peak RSS is the process's maximum resident set (``ru_maxrss``) during evaluate minus before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402  (benchmarks/ is the script's folder)

from pipeline.evaluation import metrics as M  # noqa: E402
from pipeline.store import LazyRows  # noqa: E402


def _random(key: str):
    """A loader of the network behind ``key`` with random weights (the architecture its real loader builds)."""
    import open_clip
    import torchvision

    def load(path=None):
        torch.manual_seed(0)
        if key == "alexnet":
            return torchvision.models.alexnet(weights=None).eval()
        if key == "inception_v3":
            return torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True,
                                                   init_weights=False).eval()
        if key == "efficientnet_b1":
            return torchvision.models.efficientnet_b1(weights=None).eval()
        if key == "swav_resnet50":
            return torchvision.models.resnet50(weights=None).eval()
        if key == "clip_vit_l14":
            return M.EncodeImage(open_clip.create_model(M.CLIP_ARCH, pretrained=None)).eval()
        raise KeyError(key)

    return load


def random_weight_metrics(keys: list[str] | None = None) -> tuple[M.FeatureMetric, ...]:
    """:data:`FEATURE_METRICS` with every network built with random weights (timings only)."""
    chosen = [m for m in M.FEATURE_METRICS if keys is None or m.net.key in keys]
    return tuple(dataclasses.replace(m, net=dataclasses.replace(m.net, load=_random(m.net.key))) for m in chosen)


def synthetic(size: int):
    def read(ids: np.ndarray) -> np.ndarray:
        return np.stack([np.random.default_rng(int(i)).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in ids])
    return read


def measure(n: int, size: int, keys: list[str] | None, batch_size: int, device: str) -> dict:
    gt = LazyRows(synthetic(425), np.arange(n))
    rec = LazyRows(synthetic(size), np.arange(n) + n)
    brain = np.random.default_rng(0).normal(size=(n, 768)).astype(np.float32)
    nets = random_weight_metrics(keys)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    result = M.evaluate(gt, rec, brain=brain, image=brain, metrics=nets, device=device, batch_size=batch_size,
                        pool=min(300, n))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "images": n, "gt_size": 425, "rec_size": size, "networks": sorted({m.net.key for m in nets}),
        "metrics_computed": sorted(k for k, v in result.items() if not isinstance(v, dict) and k != "n_images"),
        "seconds": round(seconds, 2), "peak_rss_bytes": peak, "peak_rss_growth_bytes": peak - before,
        "note": "random-weight networks: timings and memory only; metric values are not reported",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--networks", default="all", help="comma-separated FeatureNet keys, all, or none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = None if args.networks == "all" else [] if args.networks == "none" else args.networks.split(",")
    result = measure(args.images, args.size, keys, args.batch_size, args.device)
    result.update(device=args.device, threads=torch.get_num_threads(), machine=platform.machine(),
                  torch=torch.__version__)
    emit(result, args.out)


if __name__ == "__main__":
    main()
