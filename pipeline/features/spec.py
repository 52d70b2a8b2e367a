"""The settings of one extraction as two values: :class:`ClipSpec`, what the store holds (part of its
resume settings; the DVC params of ``extract_clip`` / ``extract_video``), and :class:`Execution`, how
it runs (the same store on any device, batch size or worker count; params.yaml ``execution``).

They travel unchanged from the stage through :func:`pipeline.features.extract.extract_clip` /
:func:`pipeline.features.video.extract_video` and :func:`pipeline.features.shards.setup` to the shard
workers, so a new knob is a field here and the line that uses it (plus its command-line option).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from .clip import DEFAULT_MODEL, DEFAULT_PRETRAINED

DEFAULT_LAYERS = "8,16,24"
"""ViT-L/14's blocks 8, 16 and 24 (early, middle, last)."""

T = TypeVar("T")


@dataclass(frozen=True)
class ClipSpec:
    """What an extraction writes: the model, which of its layers and tokens, the compute precision
    and the store's chunking. ``shard_rows`` None: the source's default (1024 images, one cc2017 segment)."""

    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    activation: str = "auto"
    layers: str = DEFAULT_LAYERS
    tokens: str = "all"
    dtype: str = "auto"
    shard_rows: int | None = None
    chunk_rows: int | None = None


@dataclass(frozen=True)
class Execution:
    """How an extraction runs; the store's content does not depend on it. ``batch_size`` None: the
    source's default (64 images, 16 clips); ``loader_workers`` None: 0 on CPU, up to 8 on GPU;
    ``workers``/``scheduler``: a local dask cluster of N processes / a running scheduler."""

    batch_size: int | None = None
    device: str = "auto"
    loader_workers: int | None = None
    workers: int | None = None
    scheduler: str | None = None
    progress: bool = True

    @property
    def distributed(self) -> bool:
        return bool(self.scheduler) or self.workers is not None


def pick(cls: type[T], values: Mapping[str, Any]) -> T:
    """A ``cls`` from the entries of ``values`` that are its fields and not None (the rest keep defaults)."""
    return cls(**{f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None})


def with_defaults(spec: ClipSpec, run: Execution, *, shard_rows: int, batch_size: int) -> tuple[ClipSpec, Execution]:
    """``spec`` and ``run`` with the source's defaults where they leave ``shard_rows`` / ``batch_size`` None."""
    return (replace(spec, shard_rows=shard_rows) if spec.shard_rows is None else spec,
            replace(run, batch_size=batch_size) if run.batch_size is None else run)


def with_options(values: tuple[Any, ...], options: Mapping[str, Any]) -> tuple[Any, ...]:
    """``values`` (dataclass instances) with keyword ``options`` applied to the one owning each name;
    an option no value owns is refused (a typo must not be ignored)."""
    owned = {f.name for v in values for f in fields(v)}
    unknown = sorted(set(options) - owned)
    if unknown:
        raise TypeError(f"unknown extraction option(s): {', '.join(unknown)}")
    return tuple(replace(v, **{f.name: options[f.name] for f in fields(v) if f.name in options}) for v in values)
