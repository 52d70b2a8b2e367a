"""Shared fixtures: a session-wide demo NSD root and the demo's fMRI and CLIP caches (each built once
per session on first use, read-only to tests: a test that changes a cache copies it first), and an
environment that cannot reach the network or the user's home cache (nilearn-style)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.demo.nsd import DemoConfig, make_demo


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    for var, value in {
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
        "TORCH_HOME": str(home / "torch"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "DVC_NO_ANALYTICS": "1",
    }.items():
        monkeypatch.setenv(var, value)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Tiny models run fastest on one intra-op thread; more only fight each other for 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo look-alike, written once per test session. Treat it as read-only."""
    return make_demo(tmp_path_factory.mktemp("demo") / "nsd", DemoConfig())


def _built_once(build: Callable[..., Path], base: Path, **defaults) -> Callable[..., Path]:
    """``build(out, **settings)`` memoised on its settings (``defaults`` filled in): one store per
    distinct settings per session, each in its own folder under ``base``."""
    made: dict[tuple, Path] = {}

    def get(**settings) -> Path:
        settings = {**defaults, **settings}
        key = tuple(sorted(settings.items()))
        if key not in made:
            made[key] = build(base / f"{len(made)}.zarr", **settings)
        return made[key]

    return get


@pytest.fixture(scope="session")
def demo_fmri(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``demo_fmri(subject=1, **prepare_fmri settings)``: the demo's fMRI cache, built once. Read-only."""
    from pipeline.data.fmri import prepare_fmri

    def build(out: Path, subject: int, **settings) -> Path:
        return prepare_fmri(demo_root, subject, out, progress=False, **settings)

    return _built_once(build, tmp_path_factory.mktemp("demo_fmri"), subject=1)


DEMO_LAYERS = "2-4:mean,6"  # the detail target (holds the demo's planted block 3) and the last block


@pytest.fixture(scope="session")
def demo_clip(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``demo_clip(**extract_clip settings)``: the demo's CLIP cache of the tiny ViT (default layers
    ``2-4:mean,6``, all tokens, captions), built once per distinct settings. Read-only."""
    from pipeline.features.extract import extract_clip

    weights = str(demo_root / "demo/nsd-tiny-vit.safetensors")

    def build(out: Path, **settings) -> Path:
        return extract_clip(demo_root, out, model="nsd-tiny-vit", pretrained=weights, progress=False, **settings)

    return _built_once(build, tmp_path_factory.mktemp("demo_clip"), layers=DEMO_LAYERS)


@pytest.fixture(scope="session")
def video_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default cc2017 look-alike (movies, CIFTI runs, tiny weights), written once. Read-only."""
    from pipeline.demo.video import make_demo_video

    return make_demo_video(tmp_path_factory.mktemp("demo_video") / "cc2017")


@pytest.fixture(scope="session")
def video_caches(video_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Subject 1's video fMRI cache and the clip cache of the look-alike (tiny ViT, 32 px frames)."""
    from pipeline.data.video_fmri import prepare_video_fmri
    from pipeline.demo.video import DEMO_DESIGN
    from pipeline.features.video import extract_video

    out = tmp_path_factory.mktemp("video_caches")
    fmri = prepare_video_fmri(video_root, 1, out / "cc2017_subj01.zarr", design=DEMO_DESIGN, progress=False)
    clip = extract_video(video_root, out / "clip.zarr", design=DEMO_DESIGN, model="nsd-tiny-vit",
                         pretrained=str(video_root / "demo/nsd-tiny-vit.safetensors"), layers="2,6,6:proj",
                         frame_size=32, progress=False)
    return {"fmri": fmri, "clip": clip}
