"""The command-line side of stage settings: the shared ``--device`` option and the user-error wrapper
(the settings themselves are resolved by :mod:`stages.settings`, which needs no typer)."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from pipeline.errors import UserError

DEVICE_HELP = "Where to compute: auto (a CUDA GPU when present, else the CPU) | cpu | cuda | cuda:K | mps [default: auto]."


def device_option() -> Any:
    """The ``--device`` option every stage shares (resolved by :func:`pipeline.device.resolve_device`)."""
    return typer.Option(None, help=DEVICE_HELP)


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
