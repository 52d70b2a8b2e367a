"""prepare-video-fmri: one cc2017 subject's CIFTI runs -> ``cache/fmri/cc2017_subjNN.zarr``.

Wen et al.'s preprocessing, as in their published code (github gongzix/NeuroClips
``preprocess/preprocess_code/source_code_v2``: ``movie_fmri_data_processing.m``,
``movie_fmri_reproducibility.m``, ``amri_sig_detrend.m``, ``amri_sig_corr.m``, ``amri_sig_r2z.m``),
per run and per cortical grayordinate:

1. keep ``trs_per_segment`` (240) volumes: those before the last ``trailing_volumes`` (4), which
   drops the first 1 (245-volume runs) or 2 (246-volume runs) as Wen's ``st = 2 | 3`` rule does;
2. remove a 4th-order polynomial trend (least squares on the 240 volumes, ``amri_sig_detrend``);
3. z-score over the window: subtract the mean, divide by MATLAB's ``std`` (sample std, ddof = 1).

Reproducibility and voxel selection (``--select reproducible``, NeuroClips' choice): for each
training segment, the Pearson r between its two repetitions' time series (``amri_sig_corr``,
mode auto), Fisher's z (``amri_sig_r2z``); then a one-sample t-test of the z values across the
training segments, one-sided (reproducible = positively correlated), and Bonferroni over all
cortical grayordinates: selected where ``p * n_cortex < alpha`` (NeuroClips: alpha .05, giving
13,447 / 14,828 / 9,114 voxels for subjects 1-3). Every grayordinate's mean r, t and p are stored,
so another threshold needs no rerun. ``--select all`` keeps every cortical grayordinate.

Rows: training runs are kept apart (one row per run and TR: ``train/betas`` (S*R*T, V), ordered by
segment, repetition, TR; ``train/clip_ids``, ``train/repeat``); test runs are averaged over their
repetitions (``test/betas`` (S*T, V), ``test/n_repeats``). ``clip_ids`` number (segment, TR) clips
as :mod:`.cc2017` does, and the CLIP video cache's rows use the same numbers.

Haemodynamic lag (``--lag L``, in TRs): the fMRI of clip t is taken from volume t + L of the kept
window, i.e. the window itself starts L volumes later (so no clip is lost: the 4 trailing volumes
after the movie hold the response to its last seconds); detrending and z-scoring run on that
shifted window. Default 2 (4 s): the BOLD response to a stimulus peaks 4-6 s after it, and Wen's
own encoding models convolve the stimulus features with a canonical HRF that peaks at 4 s
(``AlexNet_feature_processing_encoding.m``: ``spm_hrf``). NeuroClips' training code pairs row t
of its preprocessed fMRI with clip t; whether its released arrays were shifted is not visible
there: ``--lag 0`` gives exactly Wen's window.

Deviations, on purpose: the detrend projects onto an orthonormal (QR) basis of the same
polynomials (same least-squares fit, better conditioned than MATLAB's normalised monomials);
a grayordinate that is constant over a window is set to 0 (MATLAB would give NaN), so its r is
0 and it is never selected; Fisher's z clips |r| at 1 - 1e-7. The t-test and its direction are
Wen et al.'s Methods, not part of the published code. The SeriesAxis step of the files is recorded,
not checked (the design's TR is what clip timing uses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.stats
from .. import __version__
from ..errors import UserError
from ..progress import bar as progress_bar
from ..store import atomic_store
from .cc2017 import CC2017, Cortex, Design, Run
from .fmri import row_array

SELECT_MODES = ("reproducible", "all")
DETREND_ORDER = 4


# ---- per-run preprocessing ------------------------------------------------------------------------
def window(n_volumes: int, design: Design, lag: int, path: Path | str = "run") -> tuple[int, int]:
    """[start, stop) of the volumes used: the ``trs_per_segment`` before the last
    ``trailing_volumes``, shifted ``lag`` volumes later."""
    first = n_volumes - design.trs_per_segment - design.trailing_volumes
    if first < 0:
        raise UserError(f"{path}: {n_volumes} volumes, but a run needs at least "
                        f"{design.trs_per_segment + design.trailing_volumes} ({design.trs_per_segment} kept + "
                        f"{design.trailing_volumes} trailing)")
    return first + lag, first + lag + design.trs_per_segment


def polynomial_basis(n: int, order: int = DETREND_ORDER) -> np.ndarray:
    """(n, order + 1) orthonormal basis of the polynomials of degree <= ``order`` in t = 1..n."""
    t = np.linspace(-1.0, 1.0, n)
    q, _ = np.linalg.qr(np.vander(t, order + 1, increasing=True))
    return q


def detrend(x: np.ndarray, order: int = DETREND_ORDER) -> np.ndarray:
    """Remove the least-squares polynomial of degree <= ``order`` from each column of (T, V) ``x``."""
    x = np.asarray(x, dtype=np.float64)
    q = polynomial_basis(len(x), order)
    return x - q @ (q.T @ x)


def zscore(x: np.ndarray) -> np.ndarray:
    """Columns minus their mean over ``std(ddof=1)`` (MATLAB's ``std``); constant columns -> 0."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(0)
    std = x.std(0, ddof=1)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def preprocess(run: Run, design: Design, lag: int) -> np.ndarray:
    """A run's (trs_per_segment, V) float32 series: lagged window, detrended, z-scored."""
    start, stop = window(len(run.data), design, lag, run.path)
    return zscore(detrend(run.data[start:stop])).astype(np.float32)


# ---- reproducibility ------------------------------------------------------------------------------
def repeat_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column Pearson r of two (T, V) series (``amri_sig_corr(a, b, 'mode', 'auto')``); 0 if constant."""
    a = np.asarray(a, np.float64) - np.mean(a, 0)
    b = np.asarray(b, np.float64) - np.mean(b, 0)
    den = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    num = (a * b).sum(0)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def fisher_z(r: np.ndarray) -> np.ndarray:
    return np.arctanh(np.clip(r, -1 + 1e-7, 1 - 1e-7))


def reproducibility_test(r: np.ndarray) -> dict[str, np.ndarray]:
    """(S, V) per-segment repeat correlations -> mean r, t and one-sided p of a one-sample t-test of
    Fisher's z across segments (H1: mean z > 0)."""
    z = fisher_z(r)
    s = len(z)
    if s < 2:
        return {"mean_r": r.mean(0), "t": np.full(r.shape[1], np.nan), "p_value": np.full(r.shape[1], np.nan)}
    sd = z.std(0, ddof=1)
    t = np.divide(z.mean(0) * np.sqrt(s), sd, out=np.zeros(z.shape[1]), where=sd > 0)
    return {"mean_r": r.mean(0), "t": t, "p_value": scipy.stats.t.sf(t, df=s - 1)}


def select_voxels(p_value: np.ndarray, mode: str, alpha: float) -> np.ndarray:
    """Bool mask of the grayordinates kept: Bonferroni-significant ones, or all."""
    if mode == "all":
        return np.ones(len(p_value), bool)
    if np.isnan(p_value).any():
        raise UserError("--select reproducible needs at least 2 training segments (a t-test across segments)")
    return p_value * len(p_value) < alpha


# ---- the stage --------------------------------------------------------------------------------------
def prepare_video_fmri(
    root: Path | str, subject: int, out: Path | str, *, lag: int = 2, select: str = "reproducible",
    alpha: float = 0.05, design: Design = Design(), progress: bool = True,
) -> Path:
    """Build one subject's video fMRI cache; see the module docstring for the recipe and layout."""
    if select not in SELECT_MODES:
        raise UserError(f"--select must be one of {', '.join(SELECT_MODES)}, not {select!r}")
    if not isinstance(lag, int) or not 0 <= lag <= design.trailing_volumes:
        raise UserError(f"--lag {lag}: must be an integer in 0..{design.trailing_volumes} (the volumes recorded "
                        "after the movie ends)")
    if not 0 < alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), not {alpha}")
    if design.train_repeats < 2 and select == "reproducible":
        raise UserError("--select reproducible needs at least 2 repetitions of the training segments")
    data = CC2017(root, design)
    data.check_runs(subject)
    train, test = design.split("train"), design.split("test")
    cortex: Cortex | None = None
    steps, sources = set(), []
    n_total = sum(s.repeats for s in design.segments)

    def read(segment, repeat) -> np.ndarray:
        nonlocal cortex
        run = data.read_run(data.run_path(subject, segment, repeat), like=cortex)
        cortex = cortex or run.cortex
        steps.add(run.step)
        sources.append(str(run.path))
        bar.update(1)
        return preprocess(run, design, lag)

    n_t = design.trs_per_segment
    train_rows: list[np.ndarray] = []
    r = []
    test_means = []
    with progress_bar(progress, total=n_total, desc=f"subject{subject} runs", unit="run") as bar:  # erased on error
        for seg in train:
            reps = [read(seg, k) for k in range(1, seg.repeats + 1)]
            train_rows += reps
            r.append(np.mean([repeat_correlation(a, b) for i, a in enumerate(reps) for b in reps[i + 1:]], axis=0)
                     if len(reps) > 1 else np.zeros(reps[0].shape[1]))
        for seg in test:
            total = np.zeros((n_t, len(cortex.rows)), np.float64)
            for k in range(1, seg.repeats + 1):
                total += read(seg, k)
            test_means.append((total / seg.repeats).astype(np.float32))

    stats = reproducibility_test(np.stack(r))
    keep = select_voxels(stats["p_value"], select, alpha)
    if not keep.any():
        raise UserError(f"--select reproducible: no grayordinate passes Bonferroni p < {alpha} "
                        f"(best p = {np.nanmin(stats['p_value']) * len(keep):.3g} corrected); use --select all or a larger --alpha")
    idx = np.flatnonzero(keep)
    train_clips = np.concatenate([np.tile(s.clip_ids, s.repeats) for s in train])
    train_repeat = np.concatenate([np.repeat(np.arange(1, s.repeats + 1), n_t) for s in train])
    out = Path(out)
    with atomic_store(out) as store:
        betas = row_array(store, "train/betas", (len(train_clips), len(idx)), np.float32)
        for k, rows in enumerate(train_rows):
            betas[k * n_t : (k + 1) * n_t] = rows[:, idx]
        row_array(store, "train/clip_ids", train_clips.shape, np.int64)[...] = train_clips
        row_array(store, "train/repeat", train_repeat.shape, np.int64)[...] = train_repeat
        test_betas = np.concatenate(test_means)[:, idx]
        row_array(store, "test/betas", test_betas.shape, np.float32)[...] = test_betas
        test_clips = np.concatenate([s.clip_ids for s in test])
        row_array(store, "test/clip_ids", test_clips.shape, np.int64)[...] = test_clips
        row_array(store, "test/n_repeats", test_clips.shape, np.int64)[...] = np.concatenate(
            [np.full(n_t, s.repeats) for s in test])
        hemi = row_array(store, "voxels/hemisphere", (len(idx),), np.int32)
        hemi[...] = cortex.hemisphere[idx]
        hemi.attrs["labels"] = {"1": "CORTEX_LEFT", "2": "CORTEX_RIGHT"}
        row_array(store, "voxels/grayordinate", (len(idx),), np.int32)[...] = cortex.rows[idx]
        row_array(store, "voxels/vertex", (len(idx),), np.int32)[...] = cortex.vertex[idx]
        for name, values in stats.items():
            row_array(store, f"selection/{name}", values.shape, np.float64)[...] = values
        row_array(store, "selection/selected", keep.shape, bool)[...] = keep
        store.attrs.update({
            "dataset": "cc2017",
            "subject": subject,
            "design": design.as_dict(),
            "clip_layout": design.clip_layout(),
            "lag": lag,
            "lag_seconds": lag * design.tr,
            "window": f"the {n_t} volumes before the last {design.trailing_volumes}, shifted {lag} later",
            "detrend": f"polynomial of degree <= {DETREND_ORDER}, least squares, per run",
            "zscore": "per run and grayordinate over the window; sample std (ddof=1, MATLAB std)",
            "select": select,
            "alpha": alpha,
            "selection_test": "per training segment, Pearson r of the repetitions -> Fisher z; one-sided one-sample "
                              "t-test across segments; Bonferroni over the cortical grayordinates",
            "n_cortex": int(len(keep)),
            "n_selected": int(len(idx)),
            "voxel_order": "ascending CIFTI grayordinate (row of the dtseries file) among the selected",
            "series_step_seconds": sorted(s for s in steps if s is not None),
            "sources": {"root": str(data.root), "runs": sources},  # as given, as for NSD stores
            "package_version": __version__,
        })
    return out
