"""Typed settings of the stages with many: a spec of what changes their outputs (their DVC params) and
an execution spec of how they run (params.yaml ``execution``, no DVC param), each resolved once with
the precedence of :mod:`stages.settings`. No typer here: the stage commands only collect options.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

from .settings import comma_list, execution, first, given, layered, require, section


def is_multi_subject(fmri: Any, align: Any, experts: Any, init: Any, finetune: Any) -> bool:
    """Whether a fit is one multi-subject model (then ``<section>.subjects`` applies): several stores,
    or a multi-subject setting (``experts: 0`` is no experts, so not one)."""
    several = isinstance(fmri, list) and len(fmri) > 1
    return several or bool(experts) or any(v is not None for v in (align, init, finetune))


@dataclass(frozen=True)
class FitSpec:
    """What a fit-adapters run writes depends on (:func:`pipeline.fitting.fit.fit_adapters`' arguments)."""

    fmri: str | list[str]
    clip: str
    method: str
    out: Path
    targets: list[str] | None = None
    rois: list[str] | None = None
    params: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    subject: int | None = None
    seed: int = 0
    holdout_categories: list[str] | None = None
    nsd_root: str | None = None
    align: str | None = None
    experts: int | None = None
    init: str | None = None
    finetune: str | None = None
    subjects: dict[str, Any] | None = None

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``fit_adapters`` (everything after fmri, clip, method, out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)[4:]}


@dataclass(frozen=True)
class FitExecution:
    """How a fit runs; outputs do not depend on it (``execution.<section>`` in params.yaml)."""

    device: str = "auto"
    memory_gb: float | None = None  # CLIP targets held in memory; larger ones stream (None: half the free RAM)


def _experiment(base: Mapping[str, Any], name: str, experiment: str | None) -> dict[str, Any]:
    if experiment is None:
        return {}
    known = {**(base.get("experiments") or {}), **(base.get("cross_subject") or {})}
    if experiment not in known:
        raise UserError(f"params.yaml: no experiment {experiment!r} in {name}.experiments or cross_subject")
    return dict(known[experiment] or {})


def fit_spec(name: str, experiment: str | None, cli: Mapping[str, Any]) -> tuple[FitSpec, FitExecution]:
    """The settings of ``fit-adapters``: command line ``cli`` (options left None are not given) >
    experiment entry ``<name>.experiments.<experiment>`` > section ``name`` > defaults."""
    base = section(name)
    exp = _experiment(base, name, experiment)
    cli = given(cli)
    method = first(cli.get("method"), exp.get("method"))
    if method is None:
        raise UserError("give --method (ridge, mclip, litemind or perception) or --experiment")
    settings = dict(base.get(method) or {})
    top = layered(given({**cli, "fmri": comma_list(cli.get("fmri"))}), exp, base, keys=("fmri", "clip", "seed", "subject"))
    require(top, name, "fmri", "clip")
    multi = {k: first(cli.get(k), exp.get(k)) for k in ("align", "experts", "init", "finetune")}
    subjects = layered(given({"lora_rank": cli.get("lora_rank")}), exp.get("subjects"), base.get("subjects"))
    run = FitExecution(**given(layered(cli, execution(name), base, keys=[f.name for f in fields(FitExecution)])))
    train = layered(given({"epochs": cli.get("epochs"), "memory_gb": run.memory_gb}), exp.get("train"),
                    settings.pop("train", None))
    spec = FitSpec(
        fmri=top["fmri"], clip=top["clip"], method=method, out=Path(cli.get("out") or Path("runs") / (experiment or method)),
        targets=comma_list(first(cli.get("targets"), exp.get("targets"))),
        rois=comma_list(first(cli.get("rois"), exp.get("rois"))),
        params=layered(exp.get("params"), settings), train=train, subject=top.get("subject"), seed=first(top.get("seed"), 0),
        holdout_categories=comma_list(exp.get("holdout_categories")), nsd_root=base.get("nsd_root"), **multi,
        subjects=subjects if is_multi_subject(top["fmri"], **multi) else None,
    )
    return spec, run
