"""Loading diffusers / transformers weights by hub id or local folder, offline-safe, with one-line errors.

Every generative or evaluation model that is not open_clip (Stable unCLIP, the SD VAE, AnimateDiff
and its MotionAdapter, VideoMAE) is loaded through :func:`load`: a local folder must hold the
library's config file, a hub id must look like ``owner/name``, nothing is downloaded when
``local_files_only`` or ``HF_HUB_OFFLINE=1``, and "not here" becomes a :class:`UserError` naming
where it was looked for. :func:`hf_hub_cache` and :func:`hf_offline` read the Hugging Face cache
settings for every loader, open_clip's (:mod:`pipeline.features.clip`) included.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``,
    else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def hf_offline() -> bool:
    """Whether the environment forbids Hugging Face downloads (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def diffusers_module():
    """diffusers, with its and transformers' progress bars and info logs off (this tool reports its own progress)."""
    try:
        import diffusers
        import transformers
    except ImportError:
        raise UserError("this decoder needs diffusers and transformers: pip install diffusers transformers") from None
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    return diffusers


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def locate(model: str | Path, what: str, markers: tuple[str, ...] = ("model_index.json",)) -> tuple[str, bool]:
    """``model`` as the string to load from, and whether it is a local folder (which must hold one of ``markers``)."""
    name = str(model)
    local = Path(name).expanduser()
    if local.exists():
        if not any((local / m).is_file() for m in markers):
            kind = "diffusers pipeline" if markers == ("model_index.json",) else "model"
            raise UserError(f"{what}: {local} is not a {kind} folder (no {' or '.join(markers)})")
        return str(local), True
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"{what}: local folder not found and not a hub id (owner/name): {name}")
    return name, False


def options(local_files_only: bool = False, cache_dir: Path | str | None = None) -> dict[str, Any]:
    return {"local_files_only": local_files_only or hf_offline(), "cache_dir": str(cache_dir or hf_hub_cache())}


def read_config(cls, name: str, local: bool, what: str, opts: dict, file: str = "model_index.json", **kwargs) -> dict:
    """``cls.load_config``: a pipeline's ``model_index.json`` (or, with ``file="config.json"``, a
    model's config), or one clear error."""
    try:
        return dict(cls.load_config(name, **opts, **kwargs))
    except Exception as exc:  # OSError, EnvironmentError, hub errors: all mean "not here"
        where = "no such folder" if local else f"not in {opts['cache_dir']} and not downloaded"
        raise UserError(f"{what} {name!r}: cannot read its {file} ({where}; {_first_line(exc)})") from None


def load(cls, name: str, what: str, opts: dict, **kwargs):
    """``cls.from_pretrained(name, ...)``, any failure as one line."""
    try:
        return cls.from_pretrained(name, **opts, **kwargs)
    except Exception as exc:
        raise UserError(f"{what} {name!r}: cannot load its weights ({_first_line(exc)})") from None


def default_dtype(device: str, dtype: torch.dtype | None = None) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere, unless given."""
    if dtype is not None:
        return dtype
    return torch.float16 if str(device).startswith("cuda") else torch.float32
