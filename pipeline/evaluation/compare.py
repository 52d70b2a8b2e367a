"""Paired comparison of evaluated runs over the same test images (``python cli.py compare A B ...``).

Every run after the first is compared with the first, metric by metric, from the ``per_image.npz``
files ``evaluate`` wrote (``per_clip.npz`` of ``evaluate-video``: test clips instead of images;
:mod:`.intervals`):

- ``difference`` = B - A of the metric computed from the per-image scores (for retrieval: the
  expected top-1 over random pools of the protocol's size, so it can differ slightly from the
  Monte Carlo values in metrics.json); lower is better for the distances (EffNet-B, SwAV);
- ``ci95``: percentile bootstrap of the difference, the *same* resampled images for both runs (and
  pool statistics recomputed in the resampled set, :mod:`.bootstrap`); for a multi-subject run,
  subjects are resampled too;
- ``p``: two-sided sign-flip permutation test of the mean per-image difference (each test image's
  two scores exchanged at random; exact in distribution for means of per-image scores and for
  two-way identification, whose per-image score depends on that image's reconstruction only; an
  approximation for retrieval, whose per-image score depends on the other predictions too);
  ``p = (1 + #{|permuted| >= |observed|}) / (1 + permutations)``, so a run against itself gives 1;
- ``p_holm``: Holm's step-down adjustment over the metrics of one comparison.

Runs must share their subjects and, per subject, their test image ids in the same order; anything
else is refused (the differences would not be paired).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from . import bootstrap
from .intervals import metric_draws, read_per_image

PERMUTATIONS = 10000
SCORE_FILES = ("per_image.npz", "per_clip.npz")


def per_image_scores(detail: dict[str, Any]) -> np.ndarray:
    """(n,) scores against the full test set (the mean is the metric; frame-level n-way: the mean
    over frame positions)."""
    if "scores" in detail:
        return np.asarray(detail["scores"], np.float64)
    fail = np.asarray(detail["fail"])
    return np.mean([bootstrap.pool_scores(f, int(detail["pool"])) for f in (fail if fail.ndim == 3 else fail[None])], 0)


def scores_file(run: Path) -> Path:
    """The per-item scores evaluate (``per_image.npz``) or evaluate-video (``per_clip.npz``) wrote in ``run``."""
    for name in SCORE_FILES:
        if (run / name).is_file():
            return run / name
    raise UserError(f"{run}: no {' or '.join(SCORE_FILES)}; run evaluate (or evaluate-video) on it first")


def holm(p: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    >>> holm([0.04, 0.01, 0.03])  # sorted: 3 * 0.01, 2 * 0.03, then max(1 * 0.04, 0.06)
    [0.06, 0.03, 0.06]
    """
    p = np.asarray(p, np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def sign_flip_p(diffs: list[np.ndarray], permutations: int, seed: int) -> float:
    """Two-sided sign-flip p-value of the mean over groups of the mean per-image difference."""
    rng = np.random.default_rng([seed, 2])
    observed = abs(np.mean([d.mean() for d in diffs]))
    permuted = np.zeros(permutations)
    for d in diffs:
        signs = rng.choice([-1.0, 1.0], size=(permutations, len(d)))
        permuted += signs @ d / len(d)
    permuted = np.abs(permuted / len(diffs))
    return float((1 + np.sum(permuted >= observed - 1e-12)) / (1 + permutations))


def _check_paired(paths: Sequence[Path], ids: list[dict]) -> None:
    first = ids[0]
    for path, other in zip(paths[1:], ids[1:]):
        if set(other) != set(first):
            raise UserError(f"{path} is scored on subjects {sorted(map(str, other))}, {paths[0]} on "
                            f"{sorted(map(str, first))}; compare runs of the same subjects")
        for key in first:
            if not np.array_equal(first[key], other[key]):
                raise UserError(f"{path} and {paths[0]} differ in their test images"
                                + (f" of {key}" if key else "") + "; compare runs scored on the same test ids")


def compare_runs(runs: Sequence[Path | str], *, draws: int = bootstrap.DRAWS, seed: int = bootstrap.SEED,
                 permutations: int = PERMUTATIONS) -> dict[str, Any]:
    """Each run after the first against the first: see the module docstring."""
    paths = [Path(r) for r in runs]
    if len(paths) < 2:
        raise UserError("compare needs at least two run folders")
    files = [scores_file(p) for p in paths]
    if len({f.name for f in files}) > 1:
        raise UserError(f"{files[0]} and {next(f for f in files if f.name != files[0].name)}: compare image runs "
                        "with image runs and video runs with video runs")
    loaded = [read_per_image(f) for f in files]
    item = "test clip" if files[0].name == "per_clip.npz" else "test image"
    _check_paired(paths, [ids for ids, _ in loaded])
    ids0, base = loaded[0]
    weights = {key: bootstrap.resample_weights(len(ids), draws, seed) for key, ids in ids0.items()}
    comparisons = []
    for path, (_, other) in zip(paths[1:], loaded[1:]):
        names = [n for n in base[next(iter(base))] if all(n in base[k] and n in other[k] for k in base)]
        rows = {}
        for name in names:
            a = {k: per_image_scores(base[k][name]) for k in base}
            b = {k: per_image_scores(other[k][name]) for k in base}
            diff_draws = [metric_draws(other[k][name], weights[k]) - metric_draws(base[k][name], weights[k]) for k in base]
            together = diff_draws[0] if len(base) == 1 else bootstrap.subject_draws(diff_draws, seed)
            diffs = [(b[k] - a[k])[~np.isnan(b[k] - a[k])] for k in base]  # NaN: an image the metric leaves out
            rows[name] = {
                "a": float(np.mean([np.nanmean(a[k]) for k in base])),
                "b": float(np.mean([np.nanmean(b[k]) for k in base])),
                "difference": float(np.mean([np.nanmean(b[k]) - np.nanmean(a[k]) for k in base])),
                "ci95": bootstrap.percentile_ci(together),
                "p": sign_flip_p(diffs, permutations, seed),
            }
        for name, p in zip(rows, holm([r["p"] for r in rows.values()])):
            rows[name]["p_holm"] = p
        comparisons.append({"a": str(paths[0]), "b": str(path), "metrics": rows})
    return {"comparisons": comparisons,
            "settings": {"draws": draws, "seed": seed, "permutations": permutations,
                         "unit": (item if None in ids0 else f"subject, then {item} within subject"),
                         "difference": "b - a", "correction": "Holm over the metrics of each comparison"}}


def table(result: dict[str, Any]) -> str:
    """The comparisons as a plain-text table."""
    lines = []
    for comp in result["comparisons"]:
        lines.append(f"b = {comp['b']}  vs  a = {comp['a']}")
        lines.append(f"{'metric':<28}{'a':>9}{'b':>9}{'b - a':>9}  {'95% CI':<20}{'p':>8}{'p_holm':>8}")
        for name, r in comp["metrics"].items():
            ci = f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
            lines.append(f"{name:<28}{r['a']:>9.4f}{r['b']:>9.4f}{r['difference']:>+9.4f}  {ci:<20}"
                         f"{r['p']:>8.4f}{r['p_holm']:>8.4f}")
    return "\n".join(lines)
