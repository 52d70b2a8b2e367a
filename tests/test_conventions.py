"""Project-wide conventions: one error type, one way to report a missing setting, docs that name
modules that exist."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DOTTED = re.compile(r"\bpipeline(?:\.[A-Za-z_]\w*)+")


def test_user_error_is_a_value_error():
    with pytest.raises(ValueError, match="bad input"):
        raise UserError("bad input")


@pytest.mark.parametrize("args, setting", [
    # stages that reported a missing setting as typer.BadParameter (exit 2, a boxed usage message) ...
    (["decode", "--run", "r"], "decode.nsd_root"),
    (["evaluate", "--run", "r"], "evaluate.nsd_root"),
    (["prepare-fmri", "--subject", "1"], "prepare_fmri.nsd_root"),
    (["prepare-video-fmri", "--subject", "1"], "prepare_video_fmri.root"),
    (["extract-clip"], "extract_clip.stimuli"),
    (["analyze-layers", "--fmri", "f"], "analyze_layers.clip"),
    (["decode-video"], "decode_video.semantic"),
    # ... and the one that already raised UserError (exit 1, one line)
    (["fit-adapters", "--method", "ridge"], "fit_adapters.fmri"),
])
def test_missing_setting_is_one_line_and_exit_1(args, setting, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the setting is given nowhere
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: give --{setting.split('.')[1].replace('_', '-')} or set {setting} in params.yaml"]


def docs() -> list[tuple[str, str]]:
    """(where, text) of every docstring in the project's code, and of the README."""
    found = []
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("benchmarks/*.py"),
                        ROOT / "cli.py"]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if doc := ast.get_docstring(node, clean=False):
                    found.append((f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}", doc))
    found.append(("README.md", (ROOT / "README.md").read_text()))
    return found


def resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` names a module, or an attribute reached from the longest importable module."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        module = ".".join(parts[:k])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module.startswith(exc.name):
                raise  # a real module whose own import fails: not a stale name
            continue
        for attr in parts[k:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_resolves_tells_moved_names_apart():
    assert resolves("pipeline.fitting.adapters.ridge.RidgeAdapter") and resolves("pipeline.demo.nsd")
    assert not resolves("pipeline.adapters.ridge") and not resolves("pipeline.store.no_such_helper")


def test_docs_name_only_modules_and_helpers_that_exist():
    stale = [f"{where}: {name}" for where, text in docs() for name in sorted(set(DOTTED.findall(text)))
             if not resolves(name)]
    assert not stale, "docstrings/README name moved or removed code:\n" + "\n".join(stale)


def project_modules() -> list[Path]:
    return sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py"), ROOT / "cli.py"])


def test_private_name_check_sees_relative_imports_and_module_attributes(tmp_path, monkeypatch):
    import _imports

    monkeypatch.setattr(_imports, "ROOT", tmp_path)
    code = tmp_path / "pipeline" / "fitting" / "rerun.py"
    code.parent.mkdir(parents=True)
    code.write_text("from .adapters.subjects import _labels, subject_key\nfrom .. import store\nfrom ..store import atomic_dir\n"
                    "store._zarr_rows\nstore.atomic_dir\n_labels\n")
    assert _imports.private_names(code) == ["line 1: from pipeline.fitting.adapters.subjects import _labels",
                                            "line 4: store._zarr_rows"]


def test_modules_use_only_public_names_of_other_modules():
    """A helper another module needs is public (or lives with its users): private names stay private."""
    from _imports import private_names

    found = [f"{path.relative_to(ROOT)} {hit}" for path in project_modules() for hit in private_names(path)]
    assert not found, "modules take private names of other modules:\n" + "\n".join(found)


def outside_pipeline() -> set[str]:
    """Top-level import names of the code that uses pipeline: stages, cli, benchmarks, tests (and the
    modules those folders import by their bare names, such as ``_builders`` or ``report``)."""
    scripts = [*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
    return {"stages", "cli", "benchmarks", "tests", *(p.stem for p in scripts)}


def test_layer_check_sees_function_level_relative_and_package_imports(tmp_path, monkeypatch):
    import _imports

    monkeypatch.setattr(_imports, "ROOT", tmp_path)
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text('"""Layers:\n\n1. base\n2. :mod:`pipeline.data`\n'
                                                       '3. :mod:`pipeline.features` -- the caches\n"""\n')
    for package in ("data", "features"):
        (tmp_path / "pipeline" / package).mkdir()
        (tmp_path / "pipeline" / package / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "features" / "clip.py").write_text("")
    code = tmp_path / "pipeline" / "data" / "demo.py"
    code.write_text("from .. import store\nfrom ..features import clip\nfrom . import nsd\n"
                    "def f():\n    import pipeline.features.clip\n    from pipeline import features, errors\n"
                    "    from stages.params import resolve\n")
    assert _imports.layers() == ["", "data", "features"]
    assert _imports.layer_violations(code, {"stages"}) == [
        "line 2: imports pipeline.features.clip (features) into layer data",
        "line 5: imports pipeline.features.clip (features) into layer data",
        "line 6: imports pipeline.features (features) into layer data",
        "line 7: imports stages.params, which is outside pipeline"]
    assert _imports.layer_violations(tmp_path / "pipeline" / "features" / "clip.py", {"stages"}) == []


def test_pipeline_imports_flow_one_way():
    """Every import in pipeline/, those inside functions included, reads its own layer or an earlier
    one in the order pipeline/__init__.py numbers them, and nothing of the stages, cli, benchmarks or
    tests: a shared helper lives in the layer below all its users."""
    from _imports import layer_violations, layers

    packages = {p.parent.name for p in ROOT.glob("pipeline/*/__init__.py")}
    assert set(layers()[1:]) == packages, "pipeline/__init__.py must number every subpackage of pipeline as a layer"
    outside = outside_pipeline()
    found = [f"{path.relative_to(ROOT)} {hit}" for path in sorted(ROOT.glob("pipeline/**/*.py"))
             for hit in layer_violations(path, outside)]
    assert not found, "imports against the layer order of pipeline/__init__.py:\n" + "\n".join(found)
