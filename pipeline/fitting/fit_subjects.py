"""fit-adapters with several subjects (``--fmri a.zarr,b.zarr,...``), ``--align``, or ``--init``: one
multi-subject model (:mod:`.adapters.subjects`), trained from scratch or fine-tuned from a pre-trained run.

Pre-training (no ``--init``): every store's subject gets an input layer, batches mix subjects, the
trunk is shared; with ``--experts K`` a second stage trains the brain experts with everything else
frozen (``subjects.expert_epochs`` epochs). Fine-tuning (``--init runs/<pre-trained>``,
``--finetune all|lora|skip-lora``, one store): the pre-trained model, a fresh input layer for the
store's subject, and the mode's trainable parts (:mod:`.adapters.finetune`); its CLIP cache, targets,
z-scoring and repeat handling must be the pre-trained run's.

Writes ``runs/<exp>/`` like a single-subject run, with one group per subject in ``predictions.zarr``
(``subj01/test/<target>``, ``subj01/test/image_ids``, ``subj01/test/n_repeats``; root attribute
``subjects``) and in ``fit_report.json`` (``subjects.subj01.targets...``, the top-level ``targets``
being their mean); ``run.json`` records the stores, what was trained (stage, mode, trainable and
total parameters, per part) and the pre-trained run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import UserError
from ..store import write_timings
from .adapters.base import make_config
from .adapters.finetune import MODES, apply_finetune, set_trainable
from .adapters.subjects import SubjectAdapter, SubjectConfig, subject_key
from .cohort import MultiSubjectDataset
from .data import CacheDataset, TargetBank
from .distributed import is_main, teardown
from .models import build_subject_adapter, load_adapter, subject_units
from .pairs import Pairs, clip_identity, open_cohort, store_settings
from .run_folder import RunInfo, read_run_info, write_subject_outputs
from .train import TrainConfig
from .train import train as train_loop

if TYPE_CHECKING:
    from .methods import FitJob, Method

STRUCTURE = ("align", "width", "roi_width", "roi_files", "experts")  # what a fine-tuning run keeps


def load_init(init: Path | str, method: str, pairs: Pairs, targets: list[str]) -> tuple[SubjectAdapter, RunInfo]:
    """The pre-trained model of run ``init``, checked to fit this fine-tuning run."""
    init = Path(init)
    info = read_run_info(init, f"--init {init}")
    if info.method != method:
        raise UserError(f"--init {init} is a {info.method} run, not {method}")
    if not info.multi_subject:
        raise UserError(f"--init {init} is a single-subject run; pre-train with several --fmri stores (or --align) first")
    if info.extra.get("clip_identity") != clip_identity(pairs.clip):
        raise UserError(f"--init {init} was trained on another CLIP cache ({info.clip}) than {pairs.clip_path}")
    if list(info.targets or []) != list(targets):
        raise UserError(f"--init {init} predicts {info.targets}, not {targets}; use the same targets")
    ours, theirs = store_settings(pairs), info.extra.get("fmri_settings") or {}
    for key, value in ours.items():
        if theirs.get(key) != value:
            raise UserError(f"--init {init} was trained on stores with {key}={theirs.get(key)!r}, but "
                            f"{pairs.fmri_path} has {key}={value!r}")
    model = load_adapter(init / "adapters" / method)
    shapes = {t: tuple(pairs.target(t).shape[1:]) for t in targets}
    if {t: tuple(s) for t, s in model.target_shapes.items()} != shapes:
        raise UserError(f"--init {init}: its targets have shapes {model.target_shapes}, this CLIP cache {shapes}")
    return model, info


def fit_subjects(
    fmri: Sequence[Path | str], clip: Path | str, cls: type[Method], run: Path, job: FitJob, *,
    params: dict[str, Any], subjects: Mapping[str, Any] | None, init: Path | str | None, finetune: str | None,
) -> dict[str, Any]:
    """Train the multi-subject model with ``cls``'s adapter as its trunk; on the main process, write
    the run folder ``run``."""
    if finetune is not None and init is None:
        raise UserError("--finetune needs --init runs/<pre-trained run>")
    if finetune is not None and finetune not in MODES:
        raise UserError(f"--finetune must be one of {', '.join(MODES)}, not {finetune!r}")
    _, targets = cls.configure(params, None)
    cohort = open_cohort(list(fmri), clip, targets)
    scfg = make_config(SubjectConfig, subjects, "subjects")
    pre_info = model = None
    if init is not None:
        model, pre_info = _pretrained(init, cls.name, cohort, targets, subjects, scfg)
    cfg = make_config(TrainConfig, {"seed": job.seed, "device": job.device, "progress": job.progress,
                                    **dict(job.train or {}), "checkpoint_dir": str(job.checkpoints / "main")}, "train")
    data = _cohort_data(cohort, targets, cfg)
    if model is None:
        model = build_subject_adapter(cls.name, params, scfg, data, seed=job.seed)
        stages = [("pretrain", None, cfg)]
        if scfg.experts:
            stages.append(("experts", None, make_config(TrainConfig, {**dataclasses.asdict(cfg), "epochs": scfg.expert_epochs,
                           "checkpoint_dir": str(job.checkpoints / "experts")}, "train")))
    else:
        key, replaced = subject_key(cohort[0].subject), subject_key(cohort[0].subject) in model.inputs
        _add_subject(model, data.parts[cohort[0].subject], key, finetune or "all", scfg.lora_rank, job.seed)
        stages = [(finetune or "all", key, cfg)]
    trained, timings = _train_stages(model, data, stages)
    if not is_main():
        return {}
    write_timings(run, {**timings, "targets_read": data.bank.describe(), "target_reads": data.bank.reads.summary()})
    folder = cls(model, {"trained": trained}).save(run / "adapters" / cls.name)
    reloaded = cls.load(folder, {})  # predictions come from what was saved
    predictions = {p.subject: reloaded.predict(p.betas("test"), subject=p.subject) for p in cohort}
    info = {
        "fmri_settings": store_settings(cohort[0]), "clip_identity": clip_identity(cohort[0].clip),
        "align": model.config.align, "subjects_config": {**model.config.__dict__},
        "n_params": model.n_params, "parameter_counts": model.parameter_counts(),
        "trained": [{k: v for k, v in t.items() if k != "history"} for t in trained],
    }
    if init is not None:
        info.update({"init": str(init), "init_subjects": pre_info.subjects, "finetune": model.finetune,
                     "replaced_input_layer": replaced})
    return write_subject_outputs(run, cohort, RunInfo(
        method=cls.name, clip=str(cohort[0].clip_path), targets=cohort[0].targets, params=params,
        fmri=[str(p.fmri_path) for p in cohort], clip_model=cohort[0].clip.attrs.get("model"),
        subjects=[p.subject for p in cohort], extra=info), predictions)


def _pretrained(init: Path | str, method: str, cohort: Sequence[Pairs], targets: list[str],
                given: Mapping[str, Any] | None, scfg: SubjectConfig) -> tuple[SubjectAdapter, RunInfo]:
    """The pre-trained model to fine-tune, with this run's regularisation settings."""
    if len(cohort) != 1:
        raise UserError(f"--init: fine-tune one new subject at a time, not {len(cohort)} stores")
    model, pre_info = load_init(init, method, cohort[0], targets)
    clash = [k for k, v in dict(given or {}).items() if k in STRUCTURE and v != getattr(model.config, k)]
    if clash:
        raise UserError(f"--init {init} was pre-trained with {', '.join(f'{k}={getattr(model.config, k)!r}' for k in clash)}; "
                        "a fine-tuning run keeps the pre-trained structure")
    model.config.roi_dropout = scfg.roi_dropout
    model.config.lora_rank = scfg.lora_rank
    return model, pre_info


def _cohort_data(cohort: Sequence[Pairs], targets: list[str], cfg: TrainConfig) -> MultiSubjectDataset:
    """The training rows of every subject over one shared bank of CLIP targets."""
    memory = None if cfg.memory_gb is None else int(cfg.memory_gb * 1e9)
    ids = np.concatenate([p.image_ids("train") for p in cohort])
    bank = TargetBank(cohort[0].clip, targets, ids, memory, cfg.progress)
    parts = {p.subject: CacheDataset(p.betas("train"), p.image_ids("train"), p.clip, targets,
                                     p.fmri["voxels"] if "voxels" in p.fmri else None,
                                     name=f"{p.fmri_path} train", bank=bank) for p in cohort}
    return MultiSubjectDataset(parts, bank)


def _add_subject(model: SubjectAdapter, part: CacheDataset, key: str, mode: str, lora_rank: int, seed: int) -> None:
    """A fresh input layer for the fine-tuned subject and the mode's trainable parts."""
    with torch.random.fork_rng(devices=[]):  # the new input layer and LoRA A matrices are drawn from --seed
        torch.manual_seed(seed)
        model.add_subject(key, part.n_voxels, subject_units(model, part.voxels, part.n_voxels))
        apply_finetune(model, mode, lora_rank, key)


def _train_stages(model: SubjectAdapter, data: MultiSubjectDataset,
                  stages: Sequence[tuple[str, str | None, TrainConfig]]) -> tuple[list[dict], dict[str, Any]]:
    """Train each (stage, subject, config) in turn: what was trained, and the timings."""
    trained, timings = [], {}
    for stage, key, stage_cfg in stages:
        counts = set_trainable(model, stage, key)
        result = train_loop(model, data, stage_cfg)
        trained.append({"stage": stage, "subject": key, **counts, "best_epoch": result.best_epoch,
                        "epochs_run": result.epochs_run, "resumed_from": result.resumed_from,
                        "processes": result.processes, "history": result.record()["history"]})
        timings[stage] = result.timings()
    teardown()  # the last collective is behind: process 0 alone goes on, nobody waits for it
    return trained, timings
