"""Builders of small stage outputs that several test modules need (each in its own folder)."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.fmri import prepare_fmri
from pipeline.decoding.run import decode_run
from pipeline.features.extract import extract_clip
from pipeline.fitting.fit import fit_adapters


def decoded_ridge_run(demo_root: Path, base: Path, targets: list[str]) -> Path:
    """``base/run``: a ridge run of the demo's subject 1 on ``targets`` (tiny ViT, block 2), decoded."""
    fmri = prepare_fmri(demo_root, 1, base / "subj01.zarr", progress=False)
    clip = extract_clip(demo_root, base / "clip.zarr", model="nsd-tiny-vit", layers="2",
                        pretrained=str(demo_root / "demo/nsd-tiny-vit.safetensors"), progress=False)
    fit_adapters(fmri, clip, "ridge", base / "run", targets=targets,
                 params={"alphas": [10.0, 1000.0], "cv": 2}, progress=False)
    decode_run(base / "run", demo_root)
    return base / "run"
