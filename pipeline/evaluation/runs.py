"""decode and evaluate over a run folder written by fit-adapters.

``decode_run`` turns ``runs/<exp>/predictions.zarr`` into ``runs/<exp>/recon/`` (one PNG per test
image) and ``recon_grid.png``; ``evaluate_run`` scores them with the MindEye2 protocol
(:func:`pipeline.metrics.evaluate`) into ``runs/<exp>/metrics.json`` and DVC plot data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..data.nsd import NSD
from ..decoding import decode
from ..errors import UserError
from ..store import open_existing
from . import metrics

DECODERS = ("retrieval", "unclip")


def _run(run: Path) -> tuple[dict, zarr.Group, np.ndarray]:
    run = Path(run)
    info_path = run / "run.json"
    if not info_path.is_file():
        raise UserError(f"{run}: no run.json; is it a run folder written by fit-adapters?")
    preds = open_existing(run / "predictions.zarr", "predictions of the run (run fit-adapters first)")
    if "test/image_ids" not in preds:
        raise UserError(f"{run}/predictions.zarr: no test/image_ids")
    return json.loads(info_path.read_text()), preds, preds["test/image_ids"][...]


def _prediction(preds: zarr.Group, run: Path, target: str) -> np.ndarray:
    key = f"test/{target}"
    if key not in preds:
        raise UserError(f"{run}/predictions.zarr has no {key}; fit the adapter with this target first")
    return preds[key][...]


def decode_run(
    run: Path | str, nsd_root: Path | str, *, method: str = "retrieval", target: str = "image_embeds",
    include_test: bool = False, unclip_model: str | None = None, detail_target: str | None = None,
    strength: float = 0.85, steps: int = 20, guidance: float = 7.5, noise_level: int = 0,
    samples: int = 1, seed: int = 0, device: str = "cpu",
) -> Path:
    """Reconstruct every test image of a run; returns the ``recon/`` folder."""
    if method not in DECODERS:
        raise UserError(f"--method must be one of {', '.join(DECODERS)}, not {method!r}")
    run = Path(run)
    info, preds, test_ids = _run(run)
    pred = _prediction(preds, run, target)
    clip = open_existing(Path(info["clip"]), "CLIP cache of the run")
    exclude = None if include_test else test_ids
    nsd = NSD(nsd_root)
    with nsd.stimuli() as brick:
        gt = decode.take_rows(brick, test_ids)
        if method == "retrieval":
            rows, _ = decode.nearest_rows(pred, clip[target], exclude=exclude, k=samples)
            images = np.stack([decode.take_rows(brick, rows[:, s]) for s in range(samples)], axis=1)
        else:
            if unclip_model is None:
                raise UserError("--unclip-model: give a hub id or local folder of a Stable unCLIP pipeline")
            init = None
            if detail_target is not None:  # the detail branch: start from the nearest image by detail tokens
                near, _ = decode.nearest_rows(_prediction(preds, run, detail_target), clip[detail_target], exclude=exclude)
                init = decode.take_rows(brick, near[:, 0])
            pipe = decode.load_unclip(unclip_model, device=device)
            images = decode.unclip_decode(
                pipe, pred, test_ids, samples=samples, init_images=init, strength=strength, steps=steps,
                guidance=guidance, noise_level=noise_level, seed=seed,
            )
    folder = run / "recon"
    shutil.rmtree(folder, ignore_errors=True)
    decode.write_reconstructions(folder, test_ids, images)  # images: (n, samples, H, W, 3)
    decode.write_grid(run / "recon_grid.png", gt, images[:, 0])
    (run / "decode.json").write_text(json.dumps({"method": method, "target": target, "samples": samples,
                                                 "include_test": include_test, "unclip_model": unclip_model,
                                                 "detail_target": detail_target}, indent=2))
    return folder


def evaluate_run(
    run: Path | str, nsd_root: Path | str, *, weights: dict[str, str] | None = None, device: str = "cpu",
    pool: int = 300, draws: int = 30, seed: int = 42,
) -> dict[str, Any]:
    """MindEye2-protocol metrics of a decoded run -> ``metrics.json`` (and ``plots/targets.json``)."""
    run = Path(run)
    info, preds, test_ids = _run(run)
    if not (run / "recon").is_dir():
        raise UserError(f"{run}: no recon/ folder; run decode first")
    with NSD(nsd_root).stimuli() as brick:
        gt = decode.take_rows(brick, test_ids)
    rec = decode.read_reconstructions(run / "recon", test_ids)
    brain = image = None
    if "test/image_embeds" in preds:
        clip = open_existing(Path(info["clip"]), "CLIP cache of the run")
        brain = preds["test/image_embeds"][...]
        image = decode.take_rows(clip["image_embeds"], test_ids)
    n = len(test_ids)
    results = metrics.evaluate(gt, rec, brain=brain, image=image, weights=weights, device=device,
                               pool=min(pool, n), draws=draws, seed=seed)
    brainclip = brainclip_tasks(preds, info, NSD(nsd_root), test_ids, device, pool=min(pool, n), draws=draws, seed=seed)
    fit = json.loads((run / "fit_report.json").read_text()) if (run / "fit_report.json").is_file() else {}
    numbers = {k: v for k, v in results.items() if not isinstance(v, dict)}
    missing = {k: v["unavailable"] for k, v in results.items() if isinstance(v, dict)}
    out = {"method": info.get("method"), "retrieval_pool": min(pool, n), "reconstruction": numbers,
           "brainclip": brainclip, "targets": fit.get("targets", {}), "unavailable": missing}
    (run / "metrics.json").write_text(json.dumps(out, indent=2))
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    (plots / "targets.json").write_text(json.dumps(
        [{"target": t, **{k: v for k, v in r.items() if isinstance(v, float)}} for t, r in out["targets"].items()],
        indent=2))
    return out


def brainclip_tasks(preds: zarr.Group, info: dict, nsd: NSD, test_ids: np.ndarray, device: str, *,
                    pool: int, draws: int, seed: int) -> dict[str, Any]:
    """Zero-shot category decoding (class-name prompts through the cache's own CLIP text tower)
    from predicted ``image_embeds``, and fMRI->text retrieval from predicted ``text_embeds``."""
    from ..features import clip as clip_models
    from .zeroshot import caption_targets, class_embeddings, coco_categories, zero_shot_accuracy

    out: dict[str, Any] = {}
    store = open_existing(Path(info["clip"]), "CLIP cache of the run")
    if "test/image_embeds" in preds:
        names, labels = coco_categories(nsd, test_ids)
        loaded = clip_models.load_model(store.attrs["model"], store.attrs["pretrained"], device)
        classes = class_embeddings(loaded, names, device=device)
        out["zero_shot"] = zero_shot_accuracy(preds["test/image_embeds"][...], classes, labels,
                                              topk=[k for k in (1, 5) if k <= len(names)])
        out["zero_shot"]["chance_top1"] = float(labels.sum(1).mean() / len(names))
    if "test/text_embeds" in preds and "text_embeds" in store:
        truth = caption_targets(decode.take_rows(store["text_embeds"], test_ids))
        ret = metrics.retrieval_top1(preds["test/text_embeds"][...], truth, pool=pool, draws=draws, seed=seed)
        out["fmri_to_text_top1"] = ret.brain_to_image
    return out
