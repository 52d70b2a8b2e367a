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

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .. import __version__
from ..errors import UserError
from ..store import compressor, write_timings
from .adapters.base import make_config
from .adapters.finetune import MODES, apply_finetune, set_trainable
from .adapters.subjects import SubjectAdapter, SubjectConfig, subject_key
from .pairs import Pairs, clip_identity, open_cohort, store_settings, true_targets
from .scores import mean_report


def load_init(init: Path | str, method: str, pairs: Pairs, targets: list[str]) -> tuple[SubjectAdapter, dict]:
    """The pre-trained model of run ``init``, checked to fit this fine-tuning run."""
    from .models import load_adapter

    init = Path(init)
    info_path = init / "run.json"
    if not info_path.is_file():
        raise UserError(f"--init {init}: no run.json; give a run folder written by fit-adapters")
    info = json.loads(info_path.read_text())
    if info.get("method") != method:
        raise UserError(f"--init {init} is a {info.get('method')} run, not {method}")
    if not info.get("multi_subject"):
        raise UserError(f"--init {init} is a single-subject run; pre-train with several --fmri stores (or --align) first")
    if info.get("clip_identity") != clip_identity(pairs.clip):
        raise UserError(f"--init {init} was trained on another CLIP cache ({info.get('clip')}) than {pairs.clip_path}")
    if list(info.get("targets") or []) != list(targets):
        raise UserError(f"--init {init} predicts {info.get('targets')}, not {targets}; use the same targets")
    ours, theirs = store_settings(pairs), info.get("fmri_settings") or {}
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
    fmri: Sequence[Path | str], clip: Path | str, method: str, run: Path, checkpoints: Path, *,
    params: dict[str, Any], train: Mapping[str, Any] | None, subjects: Mapping[str, Any] | None,
    init: Path | str | None, finetune: str | None, seed: int, device: str, progress: bool, is_main: bool,
) -> dict[str, Any]:
    """Train the multi-subject model; on the main process, write the run folder ``run``."""
    from .cohort import MultiSubjectDataset
    from .data import CacheDataset, TargetBank
    from .distributed import teardown
    from .models import adapter_targets, build_subject_adapter, load_adapter, predict, save_adapter, subject_units
    from .train import TrainConfig
    from .train import train as train_loop

    if method == "ridge":
        raise UserError("ridge fits one subject; several --fmri stores, --align, --experts and --init need mclip or litemind")
    if finetune is not None and init is None:
        raise UserError("--finetune needs --init runs/<pre-trained run>")
    if finetune is not None and finetune not in MODES:
        raise UserError(f"--finetune must be one of {', '.join(MODES)}, not {finetune!r}")
    targets = adapter_targets(method, params)
    cohort = open_cohort(list(fmri), clip, targets)
    scfg = make_config(SubjectConfig, subjects, "subjects")
    pre_info = None
    if init is not None:
        if len(cohort) != 1:
            raise UserError(f"--init: fine-tune one new subject at a time, not {len(cohort)} stores")
        model, pre_info = load_init(init, method, cohort[0], targets)
        given = dict(subjects or {})
        clash = {k: v for k, v in given.items() if k in ("align", "width", "roi_width", "roi_files", "experts")
                 and v != getattr(model.config, k)}
        if clash:
            raise UserError(f"--init {init} was pre-trained with {', '.join(f'{k}={getattr(model.config, k)!r}' for k in clash)}; "
                            "a fine-tuning run keeps the pre-trained structure")
        model.config.roi_dropout = scfg.roi_dropout
        model.config.lora_rank = scfg.lora_rank
    cfg = make_config(TrainConfig, {"seed": seed, "device": device, "progress": progress, **dict(train or {}),
                                    "checkpoint_dir": str(checkpoints / "main")}, "train")
    memory = None if cfg.memory_gb is None else int(cfg.memory_gb * 1e9)
    ids = np.concatenate([p.image_ids("train") for p in cohort])
    bank = TargetBank(cohort[0].clip, targets, ids, memory, progress)
    parts = {p.subject: CacheDataset(p.betas("train"), p.image_ids("train"), p.clip, targets,
                                     p.fmri["voxels"] if "voxels" in p.fmri else None,
                                     name=f"{p.fmri_path} train", bank=bank) for p in cohort}
    data = MultiSubjectDataset(parts, bank)
    stages = []
    if init is None:
        model = build_subject_adapter(method, params, scfg, data, seed=seed)
        stages.append(("pretrain", None, cfg))
        if scfg.experts:
            stages.append(("experts", None, make_config(TrainConfig, {**_fields(cfg), "epochs": scfg.expert_epochs,
                           "checkpoint_dir": str(checkpoints / "experts")}, "train")))
    else:
        p = cohort[0]
        key = subject_key(p.subject)
        replaced = key in model.inputs
        mode = finetune or "all"
        with torch.random.fork_rng(devices=[]):  # the new input layer and LoRA A matrices are drawn from --seed
            torch.manual_seed(seed)
            model.add_subject(key, p.betas("train").shape[1], subject_units(model, parts[p.subject].voxels, p.betas("train").shape[1]))
            apply_finetune(model, mode, scfg.lora_rank, key)
        stages.append((mode, key, cfg))
    trained, timings = [], {}
    for stage, key, stage_cfg in stages:
        counts = set_trainable(model, stage, key)
        result = train_loop(model, data, stage_cfg)
        trained.append({"stage": stage, "subject": key, **counts, "best_epoch": result.best_epoch,
                        "epochs_run": result.epochs_run, "resumed_from": result.resumed_from,
                        "processes": result.processes, "history": result.record()["history"]})
        timings[stage] = result.timings()
    teardown()  # the last collective is behind: process 0 alone goes on, nobody waits for it
    if not is_main:
        return {}
    write_timings(run, {**timings, "targets_read": bank.describe(), "target_reads": bank.reads.summary()})
    folder = save_adapter(run / "adapters" / method, model, extra={"trained": trained})
    reloaded = load_adapter(folder)  # predictions come from what was saved
    predictions = {p.subject: predict(reloaded, p.betas("test"), subject=p.subject) for p in cohort}
    info = {
        "multi_subject": True, "subjects": [p.subject for p in cohort], "fmri": [str(p.fmri_path) for p in cohort],
        "fmri_settings": store_settings(cohort[0]), "clip_identity": clip_identity(cohort[0].clip),
        "align": model.config.align, "subjects_config": {**model.config.__dict__},
        "n_params": model.n_params, "parameter_counts": model.parameter_counts(),
        "trained": [{k: v for k, v in t.items() if k != "history"} for t in trained],
    }
    if init is not None:
        info.update({"init": str(init), "init_subjects": pre_info.get("subjects"), "finetune": model.finetune,
                     "replaced_input_layer": replaced})
    return write_subject_outputs(run, cohort, method, predictions, info, params)


def _fields(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


def write_subject_outputs(run: Path, cohort: Sequence[Pairs], method: str, predictions: Mapping[int, dict],
                          info: dict, params: Mapping[str, Any]) -> dict:
    """``predictions.zarr`` (one group per subject), ``fit_report.json`` (per subject and mean), ``run.json``."""
    from .fit import per_image, target_report

    root = zarr.open_group(run / "predictions.zarr", mode="w", zarr_format=3)
    per_subject = {}
    for pairs in cohort:
        key = subject_key(pairs.subject)
        test_ids, n_repeats, preds = per_image(pairs.image_ids("test"), predictions[pairs.subject])
        report: dict[str, Any] = {"n_test": int(len(test_ids)), "n_test_rows": int(n_repeats.sum()), "targets": {}}
        for name, pred in preds.items():
            root.create_array(f"{key}/test/{name}", data=pred, chunks=(max(1, min(len(pred), 256)), *pred.shape[1:]),
                              compressors=[compressor()])
            if len(pred) >= 2:
                report["targets"][name] = target_report(pred, true_targets(pairs.clip, name, test_ids, pred.shape[1:]))
        root.create_array(f"{key}/test/image_ids", data=test_ids)
        root.create_array(f"{key}/test/n_repeats", data=n_repeats)
        root[key].attrs.update({"subject": pairs.subject, "fmri": str(pairs.fmri_path)})
        per_subject[key] = report
    keys = list(per_subject)
    root.attrs.update({"method": method, "subjects": keys, "clip": str(cohort[0].clip_path)})
    fit_report = {"method": method, "subjects": per_subject, **mean_report(list(per_subject.values()))}
    run_info = {"method": method, "clip": str(cohort[0].clip_path), "targets": cohort[0].targets, "params": params,
                "clip_model": cohort[0].clip.attrs.get("model"), "package_version": __version__, **info}
    (run / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
    (run / "fit_report.json").write_text(json.dumps(fit_report, indent=2))
    return fit_report
