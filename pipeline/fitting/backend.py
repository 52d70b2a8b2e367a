"""Array backends for the solvers: numpy, or torch on any device (himalaya's seam).

Solvers only call the few operations of :class:`Backend` beyond ``@``, ``.T``, indexing and
arithmetic, so one solver runs on every device. The solver (``numpy`` | ``torch``) is a setting a
run records; the device (:func:`pipeline.device.resolve_device`) is an execution choice it does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..device import resolve_device
from ..errors import UserError


@dataclass(frozen=True)
class Backend:
    """The few array operations the solvers need beyond ``@``, ``.T``, indexing and arithmetic."""

    name: str
    asarray: Callable[[np.ndarray, str | None], Any]  # host array -> backend array (dtype or keep)
    to_numpy: Callable[[Any], np.ndarray]
    eigh: Callable[[Any], tuple[Any, Any]]  # symmetric eigendecomposition: values, vectors
    stack: Callable[[list[Any]], Any]
    device: str = "cpu"  # where the arrays live


def _numpy_backend() -> Backend:
    return Backend(
        name="numpy",
        asarray=lambda a, dtype: np.asarray(a, dtype=dtype),
        to_numpy=np.asarray,
        eigh=np.linalg.eigh,
        stack=np.stack,
    )


def _torch_backend(device: torch.device) -> Backend:
    def asarray(a: np.ndarray, dtype: str | None) -> Any:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return t if dtype is None else t.to(getattr(torch, dtype))

    return Backend(
        name="torch",
        asarray=asarray,
        to_numpy=lambda t: t.cpu().numpy(),
        eigh=torch.linalg.eigh,
        stack=torch.stack,
        device=str(device),
    )


SOLVERS = ("auto", "numpy", "torch")
LEGACY = {"torch_cuda": "cuda"}  # runs saved before the device was separate from the solver


def split_backend(name: str) -> tuple[str, str | None]:
    """A ridge backend name -> (solver, the device the name implies or None); ``auto`` is torch.

    ``torch_cuda`` (recorded by older runs) is torch on CUDA: the device is an execution choice,
    so a run fitted on a GPU is scored on a CPU-only machine with ``device="auto"``.
    """
    if name in LEGACY:
        return "torch", LEGACY[name]
    if name not in SOLVERS:
        raise UserError(f"ridge backend: {name!r} is not one of {', '.join(SOLVERS)} (the device is set apart)")
    return ("torch" if name == "auto" else name), None


def get_backend(name: str = "auto", device: str | torch.device = "auto") -> Backend:
    """The ``name`` solver's arrays on ``device`` (``auto``: CUDA when present); numpy is host-only."""
    solver, implied = split_backend(name)
    if solver == "numpy":
        return _numpy_backend()
    return _torch_backend(resolve_device(implied if implied and str(device) == "auto" else device))
