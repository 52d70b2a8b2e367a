"""Progress bars: shown on a terminal, quiet in logs and CI, and out of the way of an error line."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


def on_terminal() -> bool:
    """The default of long work that reports progress: on when stderr is a terminal, off under a CI
    runner (``CI=true``, set by GitHub Actions, GitLab CI and others) and in redirected logs."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return sys.stderr.isatty() and not ci


@contextmanager
def bar(enabled: bool, **kwargs: Any) -> Iterator[tqdm]:
    """A tqdm bar (``disable=not enabled``), closed on the way out; erased when an exception leaves
    through it, so the one-line error that follows starts on a clean line."""
    progress = tqdm(disable=not enabled, dynamic_ncols=True, **kwargs)
    try:
        yield progress
    except BaseException:
        progress.leave = False
        raise
    finally:
        progress.close()
