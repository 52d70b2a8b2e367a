"""Bootstrap intervals of a run's metrics and the per-image file they come from.

``evaluate`` keeps, per subject, what :func:`pipeline.evaluation.metrics.evaluate` reports per
image (``per_image``), writes it to ``runs/<exp>/per_image.npz`` (:func:`write_per_image`: a plain
``.npz``, no timestamps, byte-reproducible) for ``compare``, and adds to ``metrics.json``
(:func:`add_intervals`):

- ``ci95``: the same key paths as the point values (``reconstruction.PixCorr``,
  ``retrieval.image_to_brain``, ...) -> ``[lo, hi]``, the 95 % percentile-bootstrap interval
  (:mod:`.bootstrap`); a multi-subject run has one per subject (``subjects.subjNN.ci95``) and one
  for the subject mean, whose draws resample subjects and, within each, test images;
- ``bootstrap``: ``{draws, unit, seed, n}``.

Retrieval's interval is that of the expected top-1 accuracy over random pools of the protocol's
size (the point value stays the protocol's Monte Carlo estimate of it, 30 draws of 300).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..store import atomic_file
from . import bootstrap

PerImage = dict[str, dict[str, Any]]
"""metric name -> ``{"scores": (n,)}`` (NaN: an image the metric leaves out, e.g. one without a COCO category) or ``{"fail": (n, n) bool, "pool": p}`` (``(positions, n, n)``:
the mean of one pool statistic per position, e.g. frame-level n-way identification)."""

UNIT_IMAGES = "test image (pool statistics recomputed in the resampled set)"
UNIT_SUBJECTS = "subject, then test image within subject"
UNIT_CLIPS = "test clip (all its frames; pool statistics recomputed in the resampled set)"


def metric_path(name: str) -> tuple[str, ...]:
    """Where a metric's point value sits in metrics.json (``brainclip/zero_shot/top1``: those keys)."""
    if "/" in name:
        return tuple(name.split("/"))
    if name.startswith("retrieval_"):
        return "retrieval", name.removeprefix("retrieval_")
    return "reconstruction", name


def metric_draws(detail: Mapping[str, Any], w: np.ndarray) -> np.ndarray:
    """(draws,) bootstrap values of one metric under weights ``w``."""
    if "scores" in detail:
        return bootstrap.mean_draws(detail["scores"], w)
    fail = np.asarray(detail["fail"])
    stack = fail if fail.ndim == 3 else fail[None]  # (positions, n, n): frame-level n-way, mean over positions
    return np.mean([bootstrap.pool_draws(f, int(detail["pool"]), w) for f in stack], axis=0)


def group_draws(per_image: PerImage, n: int, draws: int, seed: int) -> dict[str, np.ndarray]:
    """Every metric's bootstrap draws for one subject (one set of resampled images for all)."""
    w = bootstrap.resample_weights(n, draws, seed)
    return {name: metric_draws(detail, w) for name, detail in per_image.items()}


def nest(flat: Mapping[str, list[float]]) -> dict[str, Any]:
    """Metric name -> value, arranged by the metrics.json sections (:func:`metric_path`)."""
    out: dict[str, Any] = {}
    for name, ci in flat.items():
        *sections, key = metric_path(name)
        at = out
        for section in sections:
            at = at.setdefault(section, {})
        at[key] = ci
    return out


def add_intervals(out: dict[str, Any], per_image: Mapping[str | None, PerImage], test_ids: Mapping[str | None, np.ndarray],
                  *, draws: int = bootstrap.DRAWS, seed: int = bootstrap.SEED) -> None:
    """Add ``ci95`` and ``bootstrap`` to a metrics dict (subject sections too); see the module docstring."""
    found = {key: group_draws(p, len(test_ids[key]), draws, seed) for key, p in per_image.items()}
    record = {"draws": draws, "seed": seed, "level": bootstrap.LEVEL, "method": "percentile"}
    if None in found:
        out["ci95"] = nest({k: bootstrap.percentile_ci(v) for k, v in found[None].items()})
        out["bootstrap"] = {**record, "unit": UNIT_IMAGES, "n": int(len(test_ids[None]))}
        return
    for key, values in found.items():
        out["subjects"][key]["ci95"] = nest({k: bootstrap.percentile_ci(v) for k, v in values.items()})
        out["subjects"][key]["bootstrap"] = {**record, "unit": UNIT_IMAGES, "n": int(len(test_ids[key]))}
    shared = set.intersection(*(set(v) for v in found.values()))
    out["ci95"] = nest({k: bootstrap.percentile_ci(bootstrap.subject_draws([found[s][k] for s in found], seed))
                         for k in sorted(shared)})
    out["bootstrap"] = {**record, "unit": UNIT_SUBJECTS, "n": {k: int(len(v)) for k, v in test_ids.items()}}


# ---- the per-image file ----------------------------------------------------------------------------------
def _prefix(key: str | None) -> str:
    return "" if key is None else f"{key}/"


def flatten(per_image: Mapping[str | None, PerImage], test_ids: Mapping[str | None, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of ``per_image.npz``: ``[subjNN/]test_ids``, ``[subjNN/]scores/<metric>``,
    ``[subjNN/]fail/<metric>`` and ``[subjNN/]pool/<metric>``."""
    arrays: dict[str, np.ndarray] = {}
    for key, details in per_image.items():
        pre = _prefix(key)
        arrays[f"{pre}test_ids"] = np.asarray(test_ids[key], np.int64)
        for name, detail in details.items():
            if "scores" in detail:
                arrays[f"{pre}scores/{name}"] = np.asarray(detail["scores"], np.float64)
            else:
                arrays[f"{pre}fail/{name}"] = np.asarray(detail["fail"], bool)
                arrays[f"{pre}pool/{name}"] = np.asarray(int(detail["pool"]), np.int64)
    return arrays


def write_per_image(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """An ``.npz`` (readable by ``np.load``) with fixed member dates and order: equal arrays, equal bytes."""
    with atomic_file(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(arrays):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, buf.getvalue())
    return Path(path)


def read_per_image(path: Path) -> tuple[dict[str | None, np.ndarray], dict[str | None, PerImage]]:
    """Test ids and per-image details per subject (None: a single-subject run) of a ``per_image.npz``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; run evaluate on {path.parent} first")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    ids: dict[str | None, np.ndarray] = {}
    details: dict[str | None, PerImage] = {}
    for name, value in arrays.items():
        parts = name.split("/")
        if parts[-1] == "test_ids":
            ids["/".join(parts[:-1]) or None] = value
            continue
        at = next(i for i, part in enumerate(parts) if part in ("scores", "fail", "pool"))
        entry = details.setdefault("/".join(parts[:at]) or None, {}).setdefault("/".join(parts[at + 1:]), {})
        entry[parts[at]] = int(value) if parts[at] == "pool" else value
    return ids, details


def clip_intervals(per_clip: PerImage, n: int, *, draws: int = bootstrap.DRAWS,
                   seed: int = bootstrap.SEED) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``ci95`` of evaluate-video's ``reconstruction`` numbers and its ``bootstrap`` record."""
    found = group_draws(per_clip, n, draws, seed)
    return ({k: bootstrap.percentile_ci(v) for k, v in found.items()},
            {"draws": draws, "seed": seed, "level": bootstrap.LEVEL, "method": "percentile", "unit": UNIT_CLIPS,
             "n": int(n)})
