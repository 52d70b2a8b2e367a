"""dvc.yaml against the code it runs: every stage lists, as deps, every module its command executes,
derived from the imports (so a new stage or a new import is checked without editing this test).

A stage runs ``python cli.py <command>``: cli.py and whatever it imports at module level, then the
command's own stage module with everything it imports, transitively, including imports inside
functions (the project imports torch-heavy modules lazily). cli.py also imports the other stage
modules; their module-level code only declares their commands, so it is not a dependency (the test
checks that they import no pipeline code at module level beyond what every stage lists anyway).
A folder dep covers the files under it; package ``__init__.py`` files that hold only a docstring
run no code and need not be listed.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import yaml
from _imports import PACKAGES, absolute

ROOT = Path(__file__).resolve().parents[1]
DATA_DEPS = {"pipeline/features/clip.py": "pipeline/model_configs"}
"""Files a module reads by path: a stage running the module lists the folder (or a file in it)."""


def module_path(name: str) -> Path | None:
    """The project file of a dotted module name, or None outside the project."""
    if name != "cli" and name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _statements(tree: ast.Module, lazy: bool):
    """Import statements of a module: all of them, or (``lazy=False``) those run at import time
    (module and class bodies, not function bodies)."""
    if lazy:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


@cache
def imported(path: Path, lazy: bool) -> frozenset[Path]:
    """Project files that importing (and, with ``lazy``, running) ``path`` imports directly."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in _statements(tree, lazy):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = absolute(node, path)
        names.add(base)
        names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    found = set()
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            if (file := module_path(".".join(parts[:k]))) is not None:
                found.add(file)
    return frozenset(found - {path})


def closure(start: Path, lazy: bool, skip: frozenset[Path] = frozenset()) -> set[Path]:
    seen, todo = {start}, [start]
    while todo:
        for dep in imported(todo.pop(), lazy):
            if dep not in seen:
                seen.add(dep)
                if dep not in skip:
                    todo.append(dep)
    return seen


def runs_code(path: Path) -> bool:
    """False for a file that holds nothing but a docstring."""
    body = ast.parse(path.read_text()).body
    return not all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stage_modules() -> dict[str, Path]:
    """cli.py's ``app.command("name")(module.command)`` registrations: command name -> stage module."""
    tree = ast.parse((ROOT / "cli.py").read_text())
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Call) and node.func.args
                and isinstance(node.func.args[0], ast.Constant) and isinstance(node.args[0], ast.Attribute)
                and isinstance(node.args[0].value, ast.Name)):
            found[node.func.args[0].value] = ROOT / "stages" / f"{node.args[0].value.id}.py"
    return found


def dvc_stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (body["do"] if "foreach" in body else body) for name, body in stages.items()}


def required_files(command: str) -> set[Path]:
    modules = stage_modules()
    others = frozenset(p for c, p in modules.items() if c != command)
    at_start = closure(ROOT / "cli.py", lazy=False, skip=frozenset()) - others
    needed = at_start | closure(modules[command], lazy=True)
    return {p for p in needed if runs_code(p)}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_cli_registrations_are_found():
    modules = stage_modules()
    assert {"make-demo", "prepare-fmri", "extract-clip", "fit-adapters", "decode", "evaluate"} <= set(modules)
    assert all(p.is_file() for p in modules.values())


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_stage_deps_list_the_code_it_runs(stage: str):
    body = dvc_stages()[stage]
    match = re.search(r"python cli\.py ([\w-]+)", body["cmd"])
    assert match, f"{stage}: cmd {body['cmd']!r} does not run `python cli.py <command>`"
    deps = [d for d in body.get("deps", []) if "${" not in d]
    needed = sorted(str(p.relative_to(ROOT)) for p in required_files(match[1]))
    missing = [p for p in needed if not covered(p, deps)]
    assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not list them as deps"
    for path, folder in DATA_DEPS.items():
        if path in needed:
            assert any(covered(d, [folder]) or d == folder for d in deps), f"{stage}: {path} reads {folder}; list it"
    code = [d for d in deps if d == "cli.py" or d.split("/")[0] in PACKAGES]
    stale = [d for d in code if d.endswith(".py") and d not in needed]
    stale += [d for d in code if (ROOT / d).is_dir() and not any(covered(p, [d]) for p in needed)
              and d not in DATA_DEPS.values()]
    assert not stale, f"dvc.yaml stage {stage} lists {stale}, which its command never imports"


def test_other_stage_modules_import_no_pipeline_code_at_startup():
    """What cli.py imports before dispatching is the same for every command: params, settings and errors."""
    modules = stage_modules()
    for path in modules.values():
        eager = {str(p.relative_to(ROOT)) for p in closure(path, lazy=False)} - {str(path.relative_to(ROOT))}
        assert eager <= {"stages/__init__.py", "stages/params.py", "stages/settings.py", "pipeline/__init__.py",
                         "pipeline/errors.py"}, (
            f"{path.name} imports {sorted(eager)} at module level; import pipeline code inside its command")


def test_import_closure_follows_relative_and_lazy_imports():
    deps = {str(p.relative_to(ROOT)) for p in closure(ROOT / "stages/evaluate.py", lazy=True)}
    # evaluate -> pipeline.evaluation.runs (lazy, in the command) -> ..decoding.decode (relative)
    # -> ..features.clip (lazy, inside brainclip_tasks)
    assert {"pipeline/evaluation/runs.py", "pipeline/decoding/decode.py", "pipeline/features/clip.py",
            "pipeline/store.py", "stages/params.py"} <= deps
    assert "pipeline/fitting/methods.py" in deps  # evaluate --drop-rois re-predicts (lazy, in evaluate_run)
    assert "pipeline/analysis/alignment.py" not in deps


def test_check_disk_budgets_the_copy_dvc_makes_of_cached_outputs(tmp_path, monkeypatch):
    from collections import namedtuple

    from dvc.repo import Repo

    from pipeline import store
    from pipeline.errors import UserError

    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  big:\n    cmd: echo\n    outs:\n      - cached\n      - uncached:\n          cache: false\n")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: usage(1000, 850, 150))
    assert store.check_disk(tmp_path / "cached", 100) == 150  # outside dvc repro: one copy
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "big")
    assert store.dvc_cache_copy(tmp_path / "uncached") is None
    assert store.check_disk(tmp_path / "uncached", 100) == 150
    assert (tmp_path / ".dvc" / "cache") in [store.dvc_cache_copy(tmp_path / "cached" / "inner"), *store.dvc_cache_copy(tmp_path / "cached").parents]
    with pytest.raises(UserError, match=r"writes up to 200.0 B .*twice: DVC copies it into its cache"):
        store.check_disk(tmp_path / "cached", 100)


def test_large_outputs_keep_one_copy():
    """The stores, adapters, predictions and reconstructions are not copied into the DVC cache."""
    big = ("cache/fmri/", "${extract_clip.out}", "/adapters", "/predictions.zarr", "/recon")
    for name, body in dvc_stages().items():
        for out in body.get("outs", []):
            path, opts = (next(iter(out.items())) if isinstance(out, dict) else (out, {}))
            if any(b in path for b in big) and not path.endswith(".png"):
                assert opts.get("cache") is False, f"{name}: {path} must be `cache: false`"
