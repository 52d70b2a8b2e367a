"""Array backends for the solvers: numpy, torch on the CPU, torch on CUDA (himalaya's seam).

Solvers only call the few operations of :class:`Backend` beyond ``@``, ``.T``, indexing and
arithmetic, so one solver runs on every device; :func:`get_backend` is the only place that knows
about devices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Backend:
    """The few array operations the solvers need beyond ``@``, ``.T``, indexing and arithmetic."""

    name: str
    asarray: Callable[[np.ndarray, str | None], Any]  # host array -> backend array (dtype or keep)
    to_numpy: Callable[[Any], np.ndarray]
    eigh: Callable[[Any], tuple[Any, Any]]  # symmetric eigendecomposition: values, vectors
    stack: Callable[[list[Any]], Any]


def _numpy_backend() -> Backend:
    return Backend(
        name="numpy",
        asarray=lambda a, dtype: np.asarray(a, dtype=dtype),
        to_numpy=np.asarray,
        eigh=np.linalg.eigh,
        stack=np.stack,
    )


def _torch_backend(device: str) -> Callable[[], Backend]:
    def make() -> Backend:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("ridge backend 'torch_cuda': no CUDA device is visible (use 'torch' or 'auto')")

        def asarray(a: np.ndarray, dtype: str | None) -> Any:
            t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
            return t if dtype is None else t.to(getattr(torch, dtype))

        return Backend(
            name="torch" if device == "cpu" else "torch_cuda",
            asarray=asarray,
            to_numpy=lambda t: t.cpu().numpy(),
            eigh=torch.linalg.eigh,
            stack=torch.stack,
        )

    return make


BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy_backend,
    "torch": _torch_backend("cpu"),
    "torch_cuda": _torch_backend("cuda"),
}


def get_backend(name: str = "auto") -> Backend:
    """A backend by name; ``"auto"`` is CUDA through torch when present, else torch on CPU."""
    if name == "auto":
        import torch

        name = "torch_cuda" if torch.cuda.is_available() else "torch"
    if name not in BACKENDS:
        raise UserError(f"ridge backend: {name!r} is not one of auto, {', '.join(BACKENDS)}")
    return BACKENDS[name]()
