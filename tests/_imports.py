"""Reading the project's imports from source (no import runs): shared by the tests that check them
(dvc.yaml deps in test_dvc.py, public names only in test_benchmarks.py and test_conventions.py)."""

from __future__ import annotations

import ast
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
