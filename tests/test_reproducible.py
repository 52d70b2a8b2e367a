"""Every stage output DVC hashes is byte-identical between two runs in two folders, so a fresh
clone's ``dvc repro`` reproduces the committed dvc.lock (and leaves ``git status`` clean).

The cheap check runs each stage's pipeline function on a small demo in two working folders whose
absolute paths differ (paths are given relative, as dvc.yaml gives them) and compares every file.
The slow one clones the repository twice and runs ``dvc repro`` in each.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.data.fmri import prepare_fmri
from pipeline.decoding.run import decode_run
from pipeline.demo.nsd import DemoConfig, make_demo
from pipeline.evaluation.runs import evaluate_run
from pipeline.features.extract import extract_clip
from pipeline.fitting.fit import fit_adapters
from pipeline.store import TIMINGS

ROOT = Path(__file__).resolve().parents[1]
SMALL = DemoConfig(n_images=120, subjects=(1,), sessions=(3,), trials_per_session=60, n_shared=12, volume=(8, 9, 7))


def tree_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip
    }


def run_pipeline(workdir: Path) -> None:
    """The demo pipeline's stages on :data:`SMALL`, with the relative paths dvc.yaml uses."""
    workdir.mkdir(parents=True)
    os.chdir(workdir)
    make_demo("data/demo", SMALL)
    prepare_fmri("data/demo", 1, "cache/fmri/subj01.zarr", progress=False)
    extract_clip("data/demo", "cache/clip/demo.zarr", model="nsd-tiny-vit", layers="2-4:mean",
                 pretrained="data/demo/demo/nsd-tiny-vit.safetensors", shard_rows=32, progress=False)
    fit_adapters("cache/fmri/subj01.zarr", "cache/clip/demo.zarr", "ridge", "runs/ridge",
                 targets=["image_embeds"], params={"alphas": [1.0, 100.0], "cv": 2}, progress=False)
    fit_adapters("cache/fmri/subj01.zarr", "cache/clip/demo.zarr", "mclip", "runs/mclip",
                 targets=["layers/2-4_mean", "image_embeds", "text_embeds"],
                 params={"width": 16, "depth": 1, "token_rank": 4},
                 train={"epochs": 2, "batch_size": 16}, progress=False, device="cpu")
    for run in ("runs/ridge", "runs/mclip"):
        decode_run(run, "data/demo")
        evaluate_run(run, "data/demo")


def test_stage_outputs_are_byte_identical_across_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_pipeline(tmp_path / "a")
    run_pipeline(tmp_path / "a-longer-path")
    first = tree_hashes(tmp_path / "a", skip=(TIMINGS,))
    second = tree_hashes(tmp_path / "a-longer-path", skip=(TIMINGS,))
    assert first.keys() == second.keys()
    differ = sorted(k for k in first if first[k] != second[k])
    assert not differ, f"outputs differ between two identical runs: {differ}"
    assert {"runs/mclip/adapters/mclip/adapter.json", "cache/clip/demo.zarr/zarr.json",
            "data/demo/nsddata/experiments/nsd/nsd_expdesign.mat"} <= first.keys()


def run_video_caches(workdir: Path, video_root: Path) -> None:
    """The cc2017 look-alike's two caches, from a copy of it at ``workdir``, with relative paths."""
    from pipeline.data.video_fmri import prepare_video_fmri
    from pipeline.demo.video import DEMO_DESIGN
    from pipeline.features.video import extract_video

    shutil.copytree(video_root, workdir / "data/demo_video")
    os.chdir(workdir)
    prepare_video_fmri("data/demo_video", 1, "cache/fmri/cc2017_subj01.zarr", design=DEMO_DESIGN, progress=False)
    extract_video("data/demo_video", "cache/clip/cc2017.zarr", design=DEMO_DESIGN, model="nsd-tiny-vit",
                  pretrained="data/demo_video/demo/nsd-tiny-vit.safetensors", layers="6", frame_size=32,
                  progress=False)


def test_video_caches_are_byte_identical_across_folders(video_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_video_caches(tmp_path / "a", video_root)
    run_video_caches(tmp_path / "a-longer-path", video_root)
    first = tree_hashes(tmp_path / "a/cache", skip=(TIMINGS,))
    second = tree_hashes(tmp_path / "a-longer-path/cache", skip=(TIMINGS,))
    assert first.keys() == second.keys() and "clip/cc2017.zarr/zarr.json" in first
    assert not sorted(k for k in first if first[k] != second[k])


def _clone_and_repro(src: Path, dest: Path) -> dict[str, str]:
    subprocess.run(["git", "clone", "-q", str(src), str(dest)], check=True)
    env = {**os.environ, "PYTHONPATH": str(dest), "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(["dvc", "repro", "-q"], cwd=dest, env=env, check=True, capture_output=True)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=dest, capture_output=True, text=True, check=True)
    return {"status": status.stdout.strip(), "lock": (dest / "dvc.lock").read_text()}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is not on PATH")
def test_fresh_clones_reproduce_the_committed_lock(tmp_path):
    """Two fresh clones of HEAD (committed state only) run ``dvc repro``: the same dvc.lock in both,
    and equal to the committed one (``git status`` clean). ~1 min per clone on 2 cores."""
    a = _clone_and_repro(ROOT, tmp_path / "a")
    b = _clone_and_repro(ROOT, tmp_path / "clone-b")
    assert a["lock"] == b["lock"], "two fresh clones' dvc repro wrote different dvc.lock files"
    assert a["status"] == "", f"dvc repro changed the clone: {a['status']} (regenerate and commit dvc.lock?)"
