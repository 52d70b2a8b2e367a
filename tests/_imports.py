"""Reading the project's imports from source (no import runs): shared by the tests that check them
(dvc.yaml deps in test_dvc.py, public names only in test_benchmarks.py and test_conventions.py, the
layer order in test_conventions.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def module_name(path: Path) -> str:
    """The dotted name of a project file (``pipeline/fitting/__init__.py`` -> ``pipeline.fitting``)."""
    rel = path.resolve().relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def absolute(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module a ``from ... import`` in ``path`` reads (relative dots resolved)."""
    if not node.level:
        return node.module or ""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    parts = package.split(".")
    anchor = parts[: len(parts) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def private_names(path: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Names starting with ``_`` that ``path`` takes from another project module: imported
    (``from x import _name``, relative or not) or read as an attribute of an imported project module
    or name (``module._name``)."""
    tree = ast.parse(path.read_text(), str(path))
    bound: set[str] = set()  # local names bound to project modules or their members
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = absolute(node, path)
            if module.split(".")[0] not in packages:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {module} import {alias.name}")
                bound.add(alias.asname or alias.name)
            if any(part.startswith("_") and not part.startswith("__") for part in module.split(".")):
                found.append(f"line {node.lineno}: from {module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in packages:
                    bound.add((alias.asname or alias.name).split(".")[0])
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def layers() -> list[str]:
    """pipeline's layers in import order, as ``pipeline/__init__.py``'s docstring numbers them: "" (the
    base modules directly in pipeline/) first, then each ``N. :mod:`pipeline.<layer>``` line's package."""
    doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / "__init__.py").read_text())) or ""
    return ["", *re.findall(r"^\d+\. :mod:`pipeline\.(\w+)`", doc, re.MULTILINE)]


def layer_of(module: str) -> str:
    """The layer of a dotted pipeline module: its subpackage (``pipeline.fitting.fit`` -> ``fitting``),
    or "" for ``pipeline`` itself and the modules directly in it."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (ROOT / "pipeline" / parts[1]).is_dir() else ""


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, at module level or inside functions, relative
    dots resolved; ``from pkg import name`` gives ``pkg.name`` where that is a project module or
    package (``from pipeline import hub`` -> ``pipeline.hub``), else ``pkg``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, path)
            for alias in node.names:
                sub = ROOT.joinpath(*base.split("."), alias.name)
                is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                found.append((node.lineno, f"{base}.{alias.name}" if is_module else base))
    return sorted(set(found))


def layer_violations(path: Path, outside: set[str]) -> list[str]:
    """Imports of a pipeline module that go against :func:`layers`: from a later layer (a back-arrow),
    or of a top-level name in ``outside`` (the stages, cli, benchmarks and tests use pipeline, not
    the other way round)."""
    order = layers()
    own = layer_of(module_name(path))
    found = []
    for line, target in imported_modules(path):
        top = target.split(".")[0]
        if top in outside:
            found.append(f"line {line}: imports {target}, which is outside pipeline")
        elif top == "pipeline" and order.index(layer_of(target)) > order.index(own):
            found.append(f"line {line}: imports {target} ({layer_of(target)}) into layer {own or 'base'}")
    return found
