"""Docstring examples are executed, so they cannot go stale: every module of ``pipeline`` and
``stages`` whose source holds a ``>>>`` example runs under doctest (found by reading the sources, so
only those modules are imported)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for package in ("pipeline", "stages")
    for path in (ROOT / package).rglob("*.py")
    if ">>>" in path.read_text()
)


def test_the_public_helpers_have_examples():
    """The examples this suite guards (a module that loses all of its examples shows up here)."""
    assert {"pipeline.store", "pipeline.device", "stages.settings", "pipeline.fitting.adapters.base",
            "pipeline.features.clip", "pipeline.evaluation.compare"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    assert tests, f"{name} holds '>>>' but doctest finds no example in it"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
