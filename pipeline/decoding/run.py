"""decode over a run folder written by fit-adapters: ``runs/<exp>/predictions.zarr`` ->
``runs/<exp>/recon/`` (one PNG per test image), ``recon_grid.png`` and ``decode.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import zarr

from ..data.nsd import NSD
from ..errors import UserError
from ..fitting.pairs import row_ids
from ..store import open_existing
from . import decode

DECODERS = ("retrieval", "unclip")


def open_run(run: Path) -> tuple[dict, zarr.Group, np.ndarray]:
    run = Path(run)
    info_path = run / "run.json"
    if not info_path.is_file():
        raise UserError(f"{run}: no run.json; is it a run folder written by fit-adapters?")
    preds = open_existing(run / "predictions.zarr", "predictions of the run (run fit-adapters first)")
    return json.loads(info_path.read_text()), preds, row_ids(preds, "test", f"{run}/predictions.zarr")


def run_prediction(preds: zarr.Group, run: Path, target: str) -> np.ndarray:
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
    info, preds, test_ids = open_run(run)
    pred = run_prediction(preds, run, target)
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
                near, _ = decode.nearest_rows(run_prediction(preds, run, detail_target), clip[detail_target], exclude=exclude)
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
