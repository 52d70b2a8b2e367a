"""The stage-2 methods by name: one :class:`Method` protocol, one registry (:data:`METHODS`).

fit-adapters, ``evaluate --drop-rois`` (:mod:`.rerun`), decode and evaluate never branch on a
method's name: they look its class up here and call the protocol. A method says how fit-adapters'
``--targets`` map onto its settings (:meth:`Method.configure`, with its own error text), fits on a
run's training rows and saves itself under ``adapters/<name>/`` (:meth:`Method.fit`), reloads
(:meth:`Method.load`, given the facts it recorded in ``run.json``) and predicts test betas, with
an optional voxel keep-mask (:meth:`Method.predict`).

Built in: ``ridge`` (:class:`RidgeMethod`, closed form, :mod:`.adapters.ridge`) and every trained
torch adapter of :data:`.models.ADAPTERS` (:class:`TorchMethod`: ``mclip``, ``litemind``,
``perception``), which can also be the shared trunk of a multi-subject model (:mod:`.fit_subjects`).
A new method is one class implementing :class:`Method` plus one line ``METHODS["name"] = Class``
(a new torch adapter: one line in :data:`.models.ADAPTERS`), as himalaya's solver dict.

On disk a run's model is ``adapters/<name>/`` in the method's own files (ridge: ``config.json`` +
``weights.safetensors``; torch: ``adapter.json`` + ``adapter.safetensors``), and ``run.json``'s
``method`` is the one spec that says which class reads it (:func:`load_method`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import UserError
from ..store import write_timings
from .adapters.base import Adapter, make_config, roi_indices
from .adapters.ridge import RidgeAdapter
from .models import ADAPTERS, build_adapter, load_adapter, predict, save_adapter
from .pairs import Pairs
from .run_folder import RunInfo


@dataclass
class FitJob:
    """How a method is fitted (execution and row selection, not what the model is)."""

    seed: int = 0
    device: str = "auto"
    progress: bool = False
    train: Mapping[str, Any] | None = None  # TrainConfig fields (trained methods)
    checkpoints: Path | None = None  # per-epoch checkpoints of a trained method (resume after a crash)
    rois: Sequence[str] | None = None  # input voxels of a method that takes_rois (None: every voxel)
    keep: np.ndarray | None = None  # training rows to fit on (bool; None: all)
    run: Path | None = None  # the run folder being written (timings.json)


class Method(Protocol):
    """A stage-2 method: fMRI betas -> CLIP-cache targets; see the module docstring."""

    name: ClassVar[str]
    takes_rois: ClassVar[bool]  # fit-adapters' --rois selects its input voxels
    trunk: ClassVar[bool]  # can be the shared trunk of a multi-subject model
    every_process: ClassVar[bool]  # under torchrun every process fits (False: process 0 alone)

    @classmethod
    def configure(cls, params: Mapping[str, Any], targets: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
        """(the settings run.json records and :meth:`fit` takes, the CLIP-cache arrays they read):
        ``params`` checked, with ``--targets`` folded in."""
        ...

    @classmethod
    def fit(cls, pairs: Pairs, folder: Path, params: Mapping[str, Any], job: FitJob) -> tuple[Method | None, dict]:
        """Fit on ``pairs``' training rows, save into ``folder``; (the fitted method, facts for run.json).
        Processes other than the main one may return (None, {})."""
        ...

    @classmethod
    def load(cls, folder: Path, facts: Mapping[str, Any]) -> Method:
        """The method saved in ``folder``; ``facts``: what its fit recorded in run.json."""
        ...

    def save(self, folder: Path) -> Path:
        """Write the fitted method to ``folder`` (what :meth:`load` reads)."""
        ...

    def predict(self, betas: np.ndarray, keep: np.ndarray | None = None,
                subject: int | None = None) -> dict[str, np.ndarray]:
        """(n, V) betas -> {target: (n, ...) float32}; ``keep`` (V,) bool: voxels to use (the others
        read as their mean, zero); ``subject``: whose betas, for a multi-subject model."""
        ...

    def parameter_counts(self) -> dict[str, int]:
        """Fitted parameters per part."""
        ...


RIDGE_EXECUTION = ("self", "seed", "progress", "device")  # set by FitJob, not params


class RidgeMethod:
    """Closed-form ridge (:class:`.adapters.ridge.RidgeAdapter`) over the input voxels ``--rois``."""

    name, takes_rois, trunk, every_process = "ridge", True, False, False
    known = tuple(p for p in inspect.signature(RidgeAdapter.__init__).parameters if p not in RIDGE_EXECUTION)

    def __init__(self, adapter: RidgeAdapter, input_voxels: np.ndarray):
        self.adapter, self.input_voxels = adapter, np.asarray(input_voxels)

    @classmethod
    def configure(cls, params: Mapping[str, Any], targets: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
        unknown = sorted(set(params) - set(cls.known))
        if unknown:
            raise UserError(f"unknown ridge parameter(s) {unknown} (known: {', '.join(cls.known)})")
        return dict(params), list(targets or ["image_embeds"])

    @classmethod
    def fit(cls, pairs: Pairs, folder: Path, params: Mapping[str, Any], job: FitJob) -> tuple[RidgeMethod, dict]:
        fmri = pairs.fmri
        voxels = {n: fmri[f"voxels/{n}"] for n in fmri["voxels"].array_keys()} if "voxels" in fmri else None
        X_train = pairs.betas("train")
        idx = roi_indices(voxels, job.rois, X_train.shape[1])
        ids = pairs.image_ids("train")
        if job.keep is not None:
            X_train, ids = X_train[job.keep], ids[job.keep]
        adapter = RidgeAdapter(**params, device=job.device, seed=job.seed, progress=job.progress)
        adapter.fit(X_train[:, idx], {t: pairs.target(t) for t in pairs.targets}, groups=ids, rows=ids, out=folder)
        alphas = {t: _alpha_summary(adapter.alpha(t)) for t in pairs.targets}
        return cls(adapter, idx), {"input_voxels": idx.tolist(), "rois": list(job.rois or []), "alphas": alphas}

    @classmethod
    def load(cls, folder: Path, facts: Mapping[str, Any]) -> RidgeMethod:
        return cls(RidgeAdapter.load(folder), facts["input_voxels"])

    def save(self, folder: Path) -> Path:
        return self.adapter.save(folder)

    def predict(self, betas: np.ndarray, keep: np.ndarray | None = None,
                subject: int | None = None) -> dict[str, np.ndarray]:
        x = np.asarray(betas) if keep is None else np.asarray(betas) * keep
        return self.adapter.predict(x[:, self.input_voxels])

    def parameter_counts(self) -> dict[str, int]:
        columns = sum(int(np.prod(t["shape"])) for t in self.adapter.targets_.values())
        return {"coef": columns * len(self.input_voxels), "intercept": columns}


def _alpha_summary(alpha: np.ndarray) -> dict[str, float]:
    return {"median": float(np.median(alpha)), "min": float(alpha.min()), "max": float(alpha.max())}


class TorchMethod:
    """A trained torch adapter (:mod:`.models`); :meth:`of` makes the method of one adapter class."""

    adapter: ClassVar[type[Adapter]]
    name: ClassVar[str]
    takes_rois, trunk, every_process = False, True, True

    def __init__(self, model: Any, extra: Mapping[str, Any] | None = None):
        self.model, self.extra = model, dict(extra or {})

    @classmethod
    def of(cls, adapter: type[Adapter]) -> type[TorchMethod]:
        return type(f"{adapter.__name__}Method", (cls,), {"adapter": adapter, "name": adapter.method})

    @classmethod
    def configure(cls, params: Mapping[str, Any], targets: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
        params = cls.adapter.with_targets(params, targets) if targets else dict(params)
        return params, cls.adapter.targets_for(make_config(cls.adapter.config_class, params, cls.name))

    @classmethod
    def fit(cls, pairs: Pairs, folder: Path, params: Mapping[str, Any], job: FitJob) -> tuple[TorchMethod | None, dict]:
        from .data import CacheDataset
        from .distributed import is_main, teardown
        from .train import TrainConfig
        from .train import train as train_loop

        cfg = make_config(TrainConfig, {"seed": job.seed, "device": job.device, "progress": job.progress,
                                        **dict(job.train or {}), "checkpoint_dir": str(job.checkpoints)}, "train")
        voxels = pairs.fmri["voxels"] if "voxels" in pairs.fmri else None
        memory = None if cfg.memory_gb is None else int(cfg.memory_gb * 1e9)
        rows = slice(None) if job.keep is None else job.keep  # held-out trials are never loaded
        data = CacheDataset(pairs.betas("train")[rows], pairs.image_ids("train")[rows], pairs.clip, pairs.targets,
                            voxels, name=f"{pairs.fmri_path} train", memory=memory, progress=job.progress)
        model = build_adapter(cls.name, params, data, seed=job.seed)
        result = train_loop(model, data, cfg)
        teardown()  # the last collective is behind: process 0 alone goes on, nobody waits for it
        if not is_main():
            return None, {}
        write_timings(job.run, {**result.timings(), "targets_read": data.bank.describe(),
                                "target_reads": data.bank.reads.summary()})
        cls(model, {"train": result.record()}).save(folder)
        return cls.load(folder, {}), {  # predictions come from what was saved
            "n_params": model.n_params, "parameter_counts": model.parameter_counts(),
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "resumed_from": result.resumed_from}

    @classmethod
    def load(cls, folder: Path, facts: Mapping[str, Any]) -> TorchMethod:
        return cls(load_adapter(folder))

    def save(self, folder: Path) -> Path:
        return save_adapter(folder, self.model, extra=self.extra)

    def predict(self, betas: np.ndarray, keep: np.ndarray | None = None,
                subject: int | None = None) -> dict[str, np.ndarray]:
        return predict(self.model, betas, subject=subject, keep=keep)

    def parameter_counts(self) -> dict[str, int]:
        return self.model.parameter_counts()


METHODS: dict[str, type[Method]] = {"ridge": RidgeMethod, **{n: TorchMethod.of(a) for n, a in ADAPTERS.items()}}
"""Every method fit-adapters knows, by ``--method`` name."""


def method_class(name: str) -> type[Method]:
    """The registered method ``name`` (a UserError listing the known ones otherwise)."""
    if name not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not {name!r}")
    return METHODS[name]


def load_method(run: Path | str, info: RunInfo) -> Method:
    """The model a run folder saved, by run.json's ``method``."""
    return method_class(info.method).load(Path(run) / "adapters" / info.method, info.extra)
