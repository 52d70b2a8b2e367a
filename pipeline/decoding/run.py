"""decode over a run folder written by fit-adapters: ``runs/<exp>/predictions.zarr`` ->
``runs/<exp>/recon/`` (one PNG per test image), ``recon_grid.png`` and ``decode.json``.

A multi-subject run (one ``subjNN/`` group per subject in ``predictions.zarr``) gets
``recon/subjNN/`` per subject and a grid with every subject's rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

from ..data.dataset import Dataset
from ..data.registry import given_root, run_dataset
from ..device import resolve_device
from ..errors import UserError
from ..features.cache import filled_rows, open_cache
from ..fitting.pairs import row_ids
from ..fitting.run_folder import RunInfo, read_run_info
from ..store import atomic_dir, atomic_file, open_existing, write_text
from . import decode

DECODERS = ("retrieval", "unclip")


Groups = dict[str | None, tuple[zarr.Group, np.ndarray]]
"""Per subject (``subjNN``; None for a single-subject run): its predictions group and test image ids."""


def open_run(run: Path) -> tuple[RunInfo, Groups]:
    """run.json and the prediction groups of a run folder."""
    run = Path(run)
    info = read_run_info(run)
    preds = open_existing(run / "predictions.zarr", "predictions of the run (run fit-adapters first)")
    keys = list(preds.attrs.get("subjects") or [None])
    groups: Groups = {}
    for key in keys:
        group = preds if key is None else preds[key]
        ids = row_ids(group, "test", f"{run}/predictions.zarr" + ("" if key is None else f" group {key}"))
        if len(np.unique(ids)) != len(ids):
            raise UserError(f"{run}/predictions.zarr holds repeats of test images; fit the run again (one row per image)")
        groups[key] = (group, ids)
    return info, groups


def run_prediction(preds: zarr.Group, run: Path, target: str) -> np.ndarray:
    key = f"test/{target}"
    if key not in preds:
        raise UserError(f"{run}/predictions.zarr has no {key}; fit the adapter with this target first")
    return preds[key][...]


def decode_run(
    run: Path | str, root: Path | str | None = None, *, nsd_root: Path | str | None = None,
    dataset: str | None = None, method: str = "retrieval", target: str = "image_embeds",
    include_test: bool = False, unclip_model: str | None = None, detail_target: str | None = None,
    strength: float = 0.85, steps: int = 20, guidance: float = decode.GUIDANCE, noise_level: int = 0,
    samples: int = 1, seed: int = 0, device: str = "auto",
) -> Path:
    """Reconstruct every test image of a run; returns the ``recon/`` folder.

    ``root``: the root of the run's dataset (``nsd_root``: its alias), named by ``dataset`` or by
    the run's fMRI stores (:func:`pipeline.data.registry.run_dataset`).
    """
    device = str(resolve_device(device))
    if method not in DECODERS:
        raise UserError(f"--method must be one of {', '.join(DECODERS)}, not {method!r}")
    run = Path(run)
    info, groups = open_run(run)
    all_ids = np.unique(np.concatenate([ids for _, ids in groups.values()]))
    clip = open_cache(Path(info.clip), rows=all_ids)
    unfilled = np.flatnonzero(~filled_rows(clip))  # a partial cache: retrieve among extracted images only
    data = run_dataset(info.stores().values(), given_root(root, nsd_root), dataset)
    if method == "unclip" and unclip_model is None:
        raise UserError("--unclip-model: give a hub id or local folder of a Stable unCLIP pipeline")
    pipe = decode.load_unclip(unclip_model, device=device) if method == "unclip" else None
    decoded = {}
    for key, (preds, test_ids) in groups.items():
        exclude = unfilled if include_test else np.union1d(test_ids, unfilled)
        decoded[key] = _decode_group(run, preds, test_ids, clip, data, exclude, pipe, method=method, target=target,
                                     detail_target=detail_target, strength=strength, steps=steps,
                                     guidance=guidance, noise_level=noise_level, samples=samples, seed=seed)
    folder = run / "recon"
    with atomic_dir(folder) as tmp:
        for key, (gt, images) in decoded.items():  # images: (n, samples, H, W, 3)
            decode.write_reconstructions(tmp if key is None else tmp / key, groups[key][1], images)
    with atomic_file(run / "recon_grid.png") as tmp:
        decode.write_grid(tmp, np.concatenate([gt for gt, _ in decoded.values()]),
                          np.concatenate([images[:, 0] for _, images in decoded.values()]))
    record = {"method": method, "target": target, "samples": samples, "include_test": include_test}
    if None not in groups:
        record["subjects"] = list(groups)
    if method == "unclip":  # what reproduces the images (evaluate copies this into metrics.json)
        record.update(unclip_model=unclip_model, steps=steps, guidance=guidance, noise_level=noise_level, seed=seed,
                      detail_target=detail_target, strength=strength if detail_target is not None else None)
    write_text(run / "decode.json", json.dumps(record, indent=2))
    return folder


def _decode_group(run: Path, preds: zarr.Group, test_ids: np.ndarray, clip: zarr.Group, data: Dataset,
                  exclude: np.ndarray, pipe, *, method: str, target: str, detail_target: str | None,
                  strength: float, steps: int, guidance: float, noise_level: int, samples: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ground-truth images, reconstructions (n, samples, H, W, 3)) of one prediction group."""
    pred = run_prediction(preds, run, target)
    with data.stimuli() as brick:
        gt = decode.take_rows(brick, test_ids)
        if method == "retrieval":
            rows, _ = decode.nearest_rows(pred, clip[target], exclude=exclude, k=samples)
            images = np.stack([decode.take_rows(brick, rows[:, s]) for s in range(samples)], axis=1)
        else:
            init = None
            if detail_target is not None:  # the detail branch: start from the nearest image by detail tokens
                near, _ = decode.nearest_rows(run_prediction(preds, run, detail_target), clip[detail_target], exclude=exclude)
                init = decode.take_rows(brick, near[:, 0])
            images = decode.unclip_decode(
                pipe, pred, test_ids, samples=samples, init_images=init, strength=strength, steps=steps,
                guidance=guidance, noise_level=noise_level, seed=seed,
            )
    return gt, images
