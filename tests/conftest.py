"""Shared fixtures: a session-wide demo NSD root, and an environment that cannot reach the network
or the user's home cache (nilearn-style)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.demo import DemoConfig, make_demo


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
