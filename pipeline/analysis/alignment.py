"""analyze-layers: which CLIP layer each brain area matches, from the caches this project already has.

For every ROI (``<file>``, ``<file>/<label>``, ``floc``) and every cached layer, over the fMRI
store's test images (the shared images, betas averaged per image):

- ``encoding``: mean over the ROI's voxels of the Pearson r between measured and predicted test
  betas; one ridge per voxel from the layer's features (z-scored with training statistics),
  alpha per voxel by grouped K-fold CV on the training images (:func:`.encoding.encode`), fitted
  on the training images' averaged betas. ``encoding_normalized`` = that mean r divided by the
  ROI's mean noise-ceiling r (``sqrt(NC/100)`` per voxel), i.e. the fraction of the attainable
  correlation; a ratio of ROI means, not a mean of per-voxel ratios, which blow up for voxels
  whose ceiling is near 0.
- ``rsa``: Spearman correlation of the ROI's RDM and the layer's RDM (1 - Pearson r between the
  images' patterns; raw features, the ROI's test betas).
- ``noise_ceiling``: NSD's ncsnr-based ceiling (:mod:`.encoding`), mean over the ROI's voxels in
  percent of variance, for the test betas as averaged (``noise_ceiling_r`` is the mean of
  ``sqrt(NC/100)``). It needs single trials: every trial-level split of ``--fmri`` is used, or
  the ``--fmri-trials`` store (``prepare-fmri --repeats trials``) when given; without either
  the ceiling and ``encoding_normalized`` are null and ``noise_ceiling_method`` says why.
- ``cka``: linear CKA between layers over the test images.
- ``encoding_ci95`` / ``rsa_ci95``: 95 % bootstrap intervals over test images of every ROI x layer
  value, and ``best_layer_test`` / ``best_layer_rsa_test``: each ROI's best layer against its
  neighbours under the same resampled images (:func:`layer_intervals`), so a best layer within
  noise of its neighbours says so.

``recommended`` (:func:`recommend`) turns the profiles into BrainMCLIP-style targets: a contiguous
``detail`` block range for the low-level areas and a ``semantic`` block for the high-level ones.

Layers are streamed one at a time (read, reduced to (images, features), fitted, dropped); only
the per-layer (test x test) Gram matrices and RDMs are kept. Encoding runs on CUDA when present.
``--features flatten`` never forms a layer's (images x tokens*channels) matrix: its column blocks
are streamed into the (images x images) Gram matrices (:func:`.inputs.flatten_grams`), and the
ridge (:func:`.encoding.encode_gram`), RDM and CKA are computed from those.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import UserError
from ..evaluation import bootstrap
from ..fitting.adapters.base import make_config
from ..fitting.backend import get_backend
from ..store import atomic_folder
from . import inputs, plots
from .encoding import EncodingConfig, encode, encode_gram, ncsnr, noise_ceiling, pearson_columns, repeat_noise, standardize
from .rsa import center_gram, centered_gram, cka, rdm, rdm_from_gram, rsa

MIN_TEST_IMAGES = 3
NC_METHOD = (
    "NSD ncsnr (Allen et al. 2022): noise_var = across-repeat variance of per-session z-scored single-trial betas "
    "(pooled over images with >= 2 trials), ncsnr = sqrt(max(0, 1 - noise_var)) / sqrt(noise_var), "
    "NC = 100 * ncsnr^2 / (ncsnr^2 + mean(1/n_i)) for the n_i trials averaged per test image; "
    "ROI value = mean over voxels"
)


@dataclass(frozen=True)
class RecommendConfig:
    """How :func:`recommend` reads the profiles (the ``recommend`` part of params.yaml's section)."""

    low: str = "prf-visualrois"  # ROI key of the low-level areas
    high: str = "floc"  # ROI key of the high-level areas
    cka_threshold: float = 0.9  # late blocks at least this similar to the semantic block are dropped...
    # ...unless some ROI prefers them


def recommend(layers: Sequence[str], encoding: Mapping[str, Mapping[str, float]],
              cka_matrix: Mapping[str, Mapping[str, float]], cfg: RecommendConfig) -> dict[str, Any]:
    """BrainMCLIP's reasoning as a rule, over the single-block layers (aggregates and projections skipped).

    1. ``semantic`` = the block the high-level ROI's encoding peaks at.
    2. The low-level ROI's encoding profile over blocks: its peak, and the contiguous run of
       blocks around the peak scoring at least half-way between the profile's minimum and its
       peak (full width at half maximum).
    3. Walking up from the peak, the range ends before the first block that is the semantic block,
       or whose CKA with the semantic block is >= ``cka_threshold`` while no ROI peaks at it (late
       blocks that look like the final one but that no area prefers: BrainMCLIP's 21-23).
    ``detail`` is ``"A-B"`` in block numbers (extract-clip ``--layers A-B:mean``).
    """
    singles = [name for name in layers if inputs.is_single_block(name)]
    rule = " ".join(recommend.__doc__.split("\n\n", 1)[1].replace("``", "").split())
    missing = [key for key in (cfg.low, cfg.high) if key not in encoding]
    if missing or len(singles) < 2:
        why = f"no ROI {missing[0]!r} analysed" if missing else "fewer than 2 single-block layers analysed"
        return {"detail": None, "semantic": None, "reason": why, "rule": rule}
    semantic = max(singles, key=lambda name: encoding[cfg.high][name])
    profile = np.array([encoding[cfg.low][name] for name in singles])
    peak = int(np.argmax(profile))
    half = profile.min() + 0.5 * (profile.max() - profile.min())
    lo = peak
    while lo > 0 and profile[lo - 1] >= half:
        lo -= 1
    hi = peak
    while hi + 1 < len(singles) and profile[hi + 1] >= half:
        hi += 1
    preferred = {max(singles, key=lambda name, r=roi: encoding[r][name]) for roi in encoding}
    end, excluded = peak, []
    for k in range(peak + 1, hi + 1):
        name = singles[k]
        if name == semantic:
            excluded.append({"block": name, "why": "the semantic block"})
            break
        if cka_matrix[name][semantic] >= cfg.cka_threshold and name not in preferred:
            excluded += [{"block": singles[j], "why": f"CKA with block {semantic} >= {cfg.cka_threshold} "
                          "and no ROI peaks there" if j == k else "after an excluded block"} for j in range(k, hi + 1)]
            break
        end = k
    return {
        "detail": f"{singles[lo]}-{singles[end]}",
        "semantic": semantic,
        "low_peak": singles[peak],
        "half_max_range": f"{singles[lo]}-{singles[hi]}",
        "excluded": excluded,
        "settings": asdict(cfg),
        "rule": rule,
    }


def _argmax(table: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    return {roi: max(row, key=row.get) for roi, row in table.items()}


def layer_intervals(draws: Mapping[str, Mapping[str, np.ndarray]], best: Mapping[str, str], names: Sequence[str],
                    what: str = "encoding") -> dict[str, Any]:
    """``<what>_ci95`` (ROI x layer 95 % bootstrap interval over test images) and the test of each best
    layer (``best_layer_test`` for encoding, ``best_layer_<what>_test`` otherwise): per ROI, the best
    layer against each adjacent layer in ``names``, a paired bootstrap over the same resampled images
    (``better``: the difference's interval excludes 0)."""
    tests = {}
    for roi, layer in best.items():
        k = names.index(layer)
        tests[roi] = {"best": layer, "neighbours": {
            names[j]: _rounded_test(bootstrap.paired_difference(draws[roi][layer], draws[roi][names[j]]))
            for j in (k - 1, k + 1) if 0 <= j < len(names)}}
        tests[roi]["better_than_neighbours"] = all(t["better"] for t in tests[roi]["neighbours"].values())
    return {
        f"{what}_ci95": {roi: {name: [round(v, 5) for v in bootstrap.percentile_ci(d)] for name, d in row.items()}
                         for roi, row in draws.items()},
        "best_layer_test" if what == "encoding" else f"best_layer_{what}_test": tests,
    }


def _rounded_test(test: dict[str, Any]) -> dict[str, Any]:
    return {**test, "ci95": [round(v, 5) for v in test["ci95"]]}


def _rounded(table: Any, digits: int = 5) -> Any:
    if isinstance(table, dict):
        return {k: _rounded(v, digits) for k, v in table.items()}
    return None if table is None else round(float(table), digits)


@dataclass(frozen=True)
class Ceiling:
    """Per-voxel NSD noise ceiling (percent), or why there is none."""

    nc: np.ndarray | None
    method: str
    sources: list[str] = field(default_factory=list)


def _ceiling(fmri, fmri_path: Path, trials_path: Path | None, test: inputs.Split) -> Ceiling:
    extra = inputs.open_fmri(trials_path) if trials_path is not None else None
    if test.trials is None:
        return Ceiling(None, f"unavailable: {fmri_path} does not say how many trials each test row averages "
                             "(no test/n_repeats)")
    sources = inputs.trial_sources(fmri, fmri_path, extra, trials_path)
    if not sources:
        return Ceiling(None, f"unavailable: {fmri_path} holds no single trials; pass --fmri-trials with a store made "
                             "by prepare-fmri --repeats trials")
    zscored = all(g.attrs.get("zscore") == "session" for g, _, _ in sources)
    ss, df, n_repeated = 0.0, 0, 0
    for source in sources:  # one split in memory at a time; train and test images never overlap
        part = repeat_noise(*inputs.read_trials(*source), zscored)
        ss, df, n_repeated = ss + part[0], df + part[1], n_repeated + part[2]
    snr = ncsnr(ss, df)
    method = NC_METHOD + f"; {n_repeated} repeated images" + ("" if zscored else "; betas z-scored per voxel over each split's trials")
    return Ceiling(noise_ceiling(snr, test.trials), method, [f"{p}:{split}" for _, p, split in sources])


def analyze_layers(
    fmri: Path | str,
    clip: Path | str,
    out: Path | str,
    *,
    layers: Sequence[str] | None = None,
    rois: Sequence[str] | None = None,
    features: str = "mean",
    fmri_trials: Path | str | None = None,
    min_voxels: int = 10,
    encoding: EncodingConfig | Mapping[str, Any] | None = None,
    recommend_cfg: RecommendConfig | Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the analysis and write ``out/`` (alignment.json, encoding.png, rsa.png, cka.png,
    plots/best_layer.json) atomically; returns the alignment.json content."""
    enc_cfg = make_config(EncodingConfig, encoding, "analyze_layers.encoding")
    rec_cfg = make_config(RecommendConfig, recommend_cfg, "analyze_layers.recommend")
    xp = get_backend(enc_cfg.backend, enc_cfg.device)  # a device this machine lacks fails before any work
    if features not in inputs.FEATURES:
        raise UserError(f"--features must be one of {', '.join(inputs.FEATURES)}, not {features!r}")
    fmri_path, clip_path, out = Path(fmri), Path(clip), Path(out)
    group = inputs.open_fmri(fmri_path)
    train, test = inputs.load_split(group, fmri_path, "train"), inputs.load_split(group, fmri_path, "test")
    if len(test.image_ids) < MIN_TEST_IMAGES:
        raise UserError(f"{fmri_path}: {len(test.image_ids)} test images; RDMs, CKA and test correlations need "
                        f"at least {MIN_TEST_IMAGES}")
    files = inputs.select_roi_files(group, fmri_path, list(rois) if rois else None)
    sets, skipped = inputs.roi_sets(group, files, min_voxels)
    if not sets:
        raise UserError(f"--rois {','.join(files)}: no ROI has >= {min_voxels} voxels")
    rows = np.union1d(train.image_ids, test.image_ids)
    cache = inputs.open_clip_cache(clip_path, rows)
    names = inputs.select_layers(cache, clip_path, list(layers) if layers else None)
    tokens = inputs.check_features(cache, clip_path, features)
    ceiling = _ceiling(group, fmri_path, Path(fmri_trials) if fmri_trials else None, test)  # reads the trials
    pos_train, pos_test = np.searchsorted(rows, train.image_ids), np.searchsorted(rows, test.image_ids)

    union = np.unique(np.concatenate(list(sets.values())))
    local = {roi: np.searchsorted(union, idx) for roi, idx in sets.items()}
    if len(union) == train.betas.shape[1]:  # every voxel: no copy of the (images, voxels) betas
        Y_train, Y_test = train.betas, test.betas
    else:
        Y_train, Y_test = train.betas[:, union], test.betas[:, union]
    roi_rdms = {roi: rdm(Y_test[:, idx]) for roi, idx in local.items()}

    enc = {roi: {} for roi in sets}
    enc_draws: dict[str, dict[str, np.ndarray]] = {roi: {} for roi in sets}
    weights = bootstrap.resample_weights(len(test.image_ids), bootstrap.DRAWS, bootstrap.SEED)
    rsa_table = {roi: {} for roi in sets}
    rsa_draws: dict[str, dict[str, np.ndarray]] = {roi: {} for roi in sets}
    grams, alphas = {}, {}
    for name in tqdm(names, desc="analyze-layers", unit="layer", disable=not progress):
        if features == "flatten":  # (images x 263k) at ViT-L/14: only Gram matrices are formed
            flat = inputs.flatten_grams(cache, name, rows, pos_train, pos_test)
            pred, chosen = encode_gram(flat.gram, pos_train, pos_test, Y_train, train.image_ids, enc_cfg, xp)
            layer_rdm = rdm_from_gram(flat.test_gram, flat.test_sums, flat.n_features)
            grams[name] = center_gram(flat.test_gram)
            del flat
        else:
            feats = inputs.layer_features(cache, name, rows, features, tokens)
            X_train, X_test = standardize(feats[pos_train], feats[pos_test])
            pred, chosen = encode(X_train, Y_train, X_test, train.image_ids, enc_cfg, xp)
            layer_rdm = rdm(feats[pos_test])
            grams[name] = centered_gram(feats[pos_test])
            del feats, X_train, X_test
        r = pearson_columns(pred, Y_test)
        r_draws = bootstrap.pearson_draws(pred, Y_test, weights)
        alphas[name] = float(np.median(chosen))
        for roi, idx in local.items():
            enc[roi][name] = float(r[idx].mean())
            enc_draws[roi][name] = r_draws[:, idx].mean(1)
            rsa_table[roi][name] = rsa(roi_rdms[roi], layer_rdm)
            rsa_draws[roi][name] = bootstrap.rdm_spearman_draws(roi_rdms[roi], layer_rdm, weights)
        del pred
    cka_table = {a: {b: cka(grams[a], grams[b]) for b in names} for a in names}

    nc = nc_r = normalized = None
    if ceiling.nc is not None:
        nc = {roi: float(ceiling.nc[idx].mean()) for roi, idx in sets.items()}
        nc_r = {roi: float(np.sqrt(ceiling.nc[idx] / 100).mean()) for roi, idx in sets.items()}
        normalized = {roi: {name: (v / nc_r[roi] if nc_r[roi] > 0 else None) for name, v in row.items()}
                      for roi, row in enc.items()}
    best, best_rsa = _argmax(enc), _argmax(rsa_table)
    result = {
        "subject": group.attrs.get("subject"),
        "fmri": str(fmri_path), "fmri_trials": None if fmri_trials is None else str(fmri_trials),
        "clip": str(clip_path), "model": cache.attrs.get("model"), "tokens": tokens, "features": features,
        "n_train_images": int(len(train.image_ids)), "n_test_images": int(len(test.image_ids)),
        "layers": names,
        "rois": list(sets),
        "rois_skipped": skipped,
        "n_voxels": {roi: int(len(idx)) for roi, idx in sets.items()},
        "encoding": _rounded(enc),
        "encoding_normalized": _rounded(normalized),
        "rsa": _rounded(rsa_table),
        "noise_ceiling": _rounded(nc),
        "noise_ceiling_r": _rounded(nc_r),
        "noise_ceiling_method": ceiling.method,
        "noise_ceiling_sources": ceiling.sources,
        "cka": _rounded(cka_table),
        "best_layer": best,
        "best_layer_rsa": best_rsa,
        **layer_intervals(enc_draws, best, names),
        **layer_intervals(rsa_draws, best_rsa, names, "rsa"),
        "bootstrap": {"draws": bootstrap.DRAWS, "seed": bootstrap.SEED, "unit": "test image",
                      "n": int(len(test.image_ids)), "method": (
                          "percentile, the same resampled images for every ROI and layer; encoding: voxel r "
                          "recomputed in each resampled set, mean over the ROI's voxels; rsa: pairs of distinct "
                          "resampled images, full-set ranks (bootstrap.rdm_spearman_draws)")},
        "recommended": recommend(names, enc, cka_table, rec_cfg),
        "ridge": {**{k: v for k, v in asdict(enc_cfg).items() if k != "alphas"},
                  "alphas": [float(a) for a in enc_cfg.alphas], "median_alpha": alphas},
        "package_version": __version__,
    }
    with atomic_folder(out) as tmp:
        (tmp / "alignment.json").write_text(json.dumps(result, indent=1) + "\n")
        roi_keys = list(sets)
        plots.heatmap([[enc[r][n] for n in names] for r in roi_keys], roi_keys, names,
                      f"Encoding: mean test r ({features} features)", tmp / "encoding.png", "Pearson r", mark_max=True)
        plots.heatmap([[rsa_table[r][n] for n in names] for r in roi_keys], roi_keys, names,
                      "RSA: Spearman(ROI RDM, layer RDM)", tmp / "rsa.png", "Spearman rho", mark_max=True)
        plots.heatmap([[cka_table[a][b] for b in names] for a in names], names, names,
                      "Linear CKA between layers (test images)", tmp / "cka.png", "CKA")
        blocks = {name: inputs.layer_blocks(cache, name) for name in names}
        plots.best_layer_plot(best, enc, blocks, tmp / "plots" / "best_layer.json")
    return result
