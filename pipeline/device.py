"""Where computation runs: the one place that turns a ``--device`` value into a :class:`torch.device`.

Every stage takes the same ``--device`` (``stages.params.device_option``); ``auto`` is a CUDA GPU
when one is present, else the CPU. Asking for a device this machine does not have is a :class:`UserError`
raised before any work starts, so nothing is half-written.
"""

from __future__ import annotations

import torch

from .errors import UserError

KINDS = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None -> ``cuda`` when a GPU is visible, else ``cpu``; anything else must exist here.

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    pipeline.errors.UserError: --device must be auto, cpu, cuda, cuda:K or mps, not 'tpu'
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:K or mps, not {device!r}") from None
    if dev.type not in KINDS:
        raise UserError(f"--device must be auto, cpu, cuda, cuda:K or mps, not {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine (use cpu or auto)")
    return dev


def worker_gpu(device: torch.device, worker: object, n_gpus: int) -> torch.device:
    """The GPU one of several local workers should use: worker k takes GPU k mod ``n_gpus``.

    Only an unindexed ``cuda`` is spread (an explicit ``cuda:K`` is the user's choice); a worker
    without an integer name (an external cluster, which sets ``CUDA_VISIBLE_DEVICES`` per worker)
    takes the first visible GPU. CUDA devices come back indexed, ready for ``torch.cuda.set_device``.
    """
    if device.type != "cuda" or device.index is not None:
        return device
    index = worker % n_gpus if isinstance(worker, int) and not isinstance(worker, bool) and n_gpus > 1 else 0
    return torch.device("cuda", index)
