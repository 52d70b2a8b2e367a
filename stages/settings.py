"""Stage settings resolved once, with one precedence; no typer here, so it is testable on its own.

Precedence, highest first: **command-line option > experiment entry > params.yaml section > code
default**. A command-line option left ``None`` is not given; any other value (``0``, ``False``,
``""``) overrides the levels below it (``--experts 0`` switches experts off even when the experiment
sets 2). A params.yaml key is given when present, even as null (:func:`layered`).

A stage's settings come from two places in params.yaml:

- its own section (``extract_clip``, ``fit_adapters``, ...): what changes its outputs. dvc.yaml lists
  these keys as the stage's params, so changing one reruns the stage;
- its entry in the ``execution`` section (``execution.extract_clip.device``, ``batch_size``,
  ``loader_workers``, ``workers``, ``scheduler``, ``memory_gb``): how it runs. No dvc.yaml stage lists
  ``execution``, so changing the device or the batch size reruns nothing (tests/test_dvc.py checks it).

A key belongs to one of the two; :func:`resolve` reads both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

PARAMS_FILE = Path("params.yaml")
EXECUTION = "execution"
"""The params.yaml section of execution-only settings, one entry per stage; no DVC stage lists it."""
EXECUTION_KEYS = frozenset({"device", "batch_size", "loader_workers", "workers", "scheduler", "memory_gb"})
"""Settings that change how a stage runs, never what it writes."""


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a mapping, or {} when there is none."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a mapping of sections")
    return data


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping")
    return value


def section(name: str, path: Path = PARAMS_FILE) -> dict[str, Any]:
    """One top-level section of params.yaml, or {} when it (or the file) is absent."""
    return _mapping(load_params(path).get(name), f"{path}: section {name!r}")


def execution(stage: str, path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The execution-only settings of ``stage`` (params.yaml ``execution.<stage>``), or {}."""
    return _mapping(section(EXECUTION, path).get(stage), f"{path}: {EXECUTION}.{stage}")


def first(*values: Any) -> Any:
    """The first value that is not None (the highest level that gives one), else None."""
    return next((v for v in values if v is not None), None)


def given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The command-line options that were given (typer leaves the others None)."""
    return {k: v for k, v in options.items() if v is not None}


def layered(*levels: Mapping[str, Any] | None, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Merge settings levels, highest precedence first: per key, the value of the first level that
    has the key. A params.yaml key set to null is given (null is then the setting's own "none", e.g.
    ``patience: null`` = never stop early); pass command-line options through :func:`given`.

    ``keys`` limits the result to those keys (default: every key of every level).
    """
    present = [level or {} for level in levels]
    names = list(keys) if keys is not None else list(dict.fromkeys(k for level in present for k in level))
    return {k: next(level[k] for level in present if k in level) for k in names if any(k in lv for lv in present)}


def resolve(name: str, **options: Any) -> dict[str, Any]:
    """Command-line ``options`` (None: not given) over params.yaml section ``name`` and its
    ``execution`` entry, limited to the keys of ``options``; keys left None are dropped, so the
    callee's own default applies."""
    merged = layered(given(options), section(name), execution(name), keys=options)
    return {k: v for k, v in merged.items() if v is not None}


def require(params: Mapping[str, Any], name: str, *keys: str) -> None:
    """Fail with one line (a :class:`UserError`, exit 1) when a setting :func:`resolve` returned
    has neither a command-line option nor a value in params.yaml section ``name``."""
    for key in keys:
        if params.get(key) is None:
            raise UserError(f"give --{key.replace('_', '-')} or set {name}.{key} in params.yaml")


def comma_list(value: Any) -> list[str] | None:
    """A list option given as ``"a,b"`` on the command line or as a YAML list/scalar; None when empty.

    >>> comma_list("floc, prf-visualrois,"), comma_list(["image_embeds"]), comma_list(3), comma_list("")
    (['floc', 'prf-visualrois'], ['image_embeds'], ['3'], None)
    """
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()] or None


PRESETS = Path(__file__).resolve().parents[1] / "presets"
"""Named settings (``presets/<name>.yaml``): ``demo`` (what params.yaml holds) and ``nsd`` (real data)."""


def apply_preset(params: Mapping[str, Any], preset: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with a preset applied: mappings merge key by key, any other value replaces; the
    preset's ``unset`` list of dotted keys removes settings, so the code's own defaults apply."""
    preset = dict(preset)
    unset = preset.pop("unset", None) or []
    merged = _merge(params, preset)
    for key in unset:
        *parents, last = str(key).split(".")
        node = merged
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return merged


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in over.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both else value
    return out
