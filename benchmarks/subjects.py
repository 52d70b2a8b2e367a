"""Cross-subject transfer on the synthetic demo: pre-train on three subjects, fine-tune the fourth
on one session, against the same model from scratch on that session, ridge, and the fourth subject
on all its sessions; each over several seeds (mean, sd, min, max of the fourth subject's test scores).

    python benchmarks/subjects.py                       # the demo's defaults, 3 seeds (~10 min on 2 cores)
    python benchmarks/subjects.py --seeds 0,1 --epochs 10 --code-share 0.7   # a quicker look

Every number is from the planted look-alike (synthetic data, a random-weight tiny ViT): it shows
whether transfer happens on a known answer, not how NSD behaves. Prints JSON (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from pipeline.data.fmri import prepare_fmri  # noqa: E402
from pipeline.demo.nsd import DemoConfig, make_demo  # noqa: E402
from pipeline.features.extract import extract_clip  # noqa: E402
from pipeline.fitting.fit import fit_adapters  # noqa: E402

TARGETS = ["layers/2-4_mean", "image_embeds", "text_embeds"]
SCORES = ("top1_retrieval", "two_way_identification", "pearson_r")


def spread(values: list[float]) -> str:
    """``mean ± sd [min, max]`` over seeds."""
    v = np.asarray(values, float)
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return f"{v.mean():.3f} ± {sd:.3f} [{v.min():.3f}, {v.max():.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--finetune-epochs", type=int, default=30)
    ap.add_argument("--width", type=int, default=64, help="mclip width")
    ap.add_argument("--subject-width", type=int, default=64)
    ap.add_argument("--align", default="voxels")
    ap.add_argument("--modes", default="all,lora,skip-lora")
    ap.add_argument("--code-share", type=float, default=None)
    ap.add_argument("--code-bandwidth", type=float, default=None)
    ap.add_argument("--code-dim", type=int, default=None)
    ap.add_argument("--noise", type=float, default=None)
    ap.add_argument("--target", default="image_embeds", help="the array whose test scores are reported")
    ap.add_argument("--work", default=None, help="folder to keep the demo and runs in (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = {k: v for k, v in (("code_share", args.code_share), ("code_bandwidth", args.code_bandwidth),
                                    ("code_dim", args.code_dim), ("noise", args.noise)) if v is not None}
    cfg = DemoConfig(**overrides)
    new = cfg.subjects[-1]
    work = Path(args.work or tempfile.mkdtemp(prefix="subjects-bench-"))
    t0 = time.perf_counter()
    root = make_demo(work / "nsd", cfg) if not (work / "nsd").exists() else work / "nsd"
    stores = {s: prepare_fmri(root, s, work / f"subj{s:02d}.zarr", progress=False) for s in cfg.subjects}
    one = prepare_fmri(root, new, work / f"subj{new:02d}_1sess.zarr", train_sessions=1, progress=False)
    clip = extract_clip(root, work / "clip.zarr", model=cfg.model, layers="2-4:mean,6",
                        pretrained=str(root / "demo" / f"{cfg.model}.safetensors"), progress=False)
    setup_s = time.perf_counter() - t0
    params = {"detail_target": TARGETS[0], "text_target": TARGETS[2], "width": args.width, "depth": 1, "token_rank": 8}
    subjects = {"width": args.subject_width}
    common = dict(params=params, subjects=subjects, progress=False, align=args.align)

    def train(epochs: int, seed: int) -> dict:
        return {"epochs": epochs, "batch_size": 16, "lr": 3e-3, "patience": None, "seed": seed}

    def score(report: dict) -> dict:
        return {k: round(report["targets"][args.target][k], 4) for k in SCORES}

    runs: dict[str, list[dict]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        pre = work / f"shared_{seed}"
        fit_adapters([stores[s] for s in cfg.subjects[:-1]], clip, "mclip", pre, train=train(args.epochs, seed),
                     seed=seed, **common)
        for mode in args.modes.split(","):
            r = fit_adapters([one], clip, "mclip", work / f"ft_{mode}_{seed}", init=pre, finetune=mode,
                             train=train(args.finetune_epochs, seed), seed=seed, params=params, progress=False,
                             subjects=subjects)
            info = json.loads((work / f"ft_{mode}_{seed}" / "run.json").read_text())
            runs.setdefault(f"finetune_1sess[{mode}]", []).append(
                {**score(r), "trainable": info["trained"][0]["trainable"], "total": info["trained"][0]["total"]})
        r = fit_adapters([one], clip, "mclip", work / f"scratch_{seed}", train=train(args.finetune_epochs, seed), seed=seed, **common)
        runs.setdefault("scratch_1sess", []).append(score(r))
        r = fit_adapters([stores[new]], clip, "mclip", work / f"all_{seed}", train=train(args.finetune_epochs, seed), seed=seed, **common)
        runs.setdefault("scratch_all_sessions", []).append(score(r))
    ridge = fit_adapters(one, clip, "ridge", work / "ridge_1sess", targets=[args.target], progress=False,
                         params={"alphas": [1.0, 10.0, 100.0, 1000.0, 10000.0], "cv": 3})
    out = {"synthetic": "planted demo look-alike, random tiny ViT: not NSD numbers",
           "demo": {k: getattr(cfg, k) for k in ("subjects", "sessions", "trials_per_session", "n_shared", "noise",
                                                  "code_dim", "code_bandwidth", "code_share")},
           "new_subject": new, "target": args.target, "align": args.align, "setup_seconds": round(setup_s, 1),
           "ridge_1sess": score(ridge), "n_test": ridge["n_test"],
           "runs": {name: {k: spread([r[k] for r in rs]) for k in rs[0]} for name, rs in runs.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    emit(out)


if __name__ == "__main__":
    main()
