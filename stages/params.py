"""Stage parameters: ``params.yaml`` sections, overridden by options given on the command line."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml

from pipeline.errors import UserError

PARAMS_FILE = Path("params.yaml")
DEVICE_HELP = "Where to compute: auto (a CUDA GPU when present, else the CPU) | cpu | cuda | cuda:K | mps [default: auto]."


def device_option() -> Any:
    """The ``--device`` option every stage shares (resolved by :func:`pipeline.device.resolve_device`)."""
    return typer.Option(None, help=DEVICE_HELP)


def section(name: str, path: Path = PARAMS_FILE) -> dict[str, Any]:
    """One top-level section of params.yaml, or {} when there is no params file."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise UserError(f"{path}: section {name!r} must be a mapping")
    return value


def resolve(name: str, **options: Any) -> dict[str, Any]:
    """Options given on the command line (not None) win over params.yaml; unset keys are dropped
    so the pipeline function's own default applies."""
    params = section(name)
    merged = {k: (v if v is not None else params.get(k)) for k, v in options.items()}
    return {k: v for k, v in merged.items() if v is not None}


def require(params: dict[str, Any], name: str, *keys: str) -> None:
    """Fail with one line (a :class:`UserError`, exit 1) when a setting ``resolve(name, ...)`` returned
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


def user_errors(func: Callable) -> Callable:
    """Turn the failures a user can cause into one line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                typer.echo(f"error: disk full while writing {exc.filename or ''}".rstrip(), err=True)
                raise typer.Exit(1) from None
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper
