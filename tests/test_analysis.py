"""analyze-layers: RDMs/RSA against rsatoolbox, CKA against its formula, the encoding ridge against
scikit-learn, NSD's noise ceiling against its definition, the planted demo hierarchy, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy.stats import ortho_group
from typer.testing import CliRunner

from cli import app
from pipeline.analysis import inputs
from pipeline.analysis.alignment import RecommendConfig, analyze_layers, recommend
from pipeline.analysis.encoding import (EncodingConfig, encode, encode_gram, ncsnr, noise_ceiling, pearson_columns,
                                       repeat_noise, standardize)
from pipeline.analysis.rsa import center_gram, centered_gram, cka, linear_cka, rdm, rdm_from_gram, rsa
from pipeline.fitting.adapters.ridge_solvers import grouped_folds

BLOCKS = [str(b) for b in range(1, 7)]


# ---- RDMs, RSA, CKA --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 20), (9, 4)])
def test_rdm_and_rsa_equal_rsatoolbox(shape):
    from rsatoolbox.data import Dataset
    from rsatoolbox.rdm import calc_rdm, compare

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=shape), rng.normal(size=(shape[0], 7)) + rng.normal(size=(shape[0], 1))
    ref_x, ref_y = (calc_rdm(Dataset(A), method="correlation") for A in (X, Y))
    np.testing.assert_allclose(rdm(X), ref_x.dissimilarities[0], atol=1e-12)
    np.testing.assert_allclose(rdm(Y), ref_y.dissimilarities[0], atol=1e-12)
    assert rsa(rdm(X), rdm(Y)) == pytest.approx(compare(ref_x, ref_y, method="spearman")[0, 0], abs=1e-12)
    tied = np.round(rdm(X), 1)  # ties get average ranks, as in rsatoolbox
    ref_tied = calc_rdm(Dataset(X), method="correlation")
    ref_tied.dissimilarities = tied[None]
    assert rsa(tied, rdm(Y)) == pytest.approx(compare(ref_tied, ref_y, method="spearman")[0, 0], abs=1e-12)


def _cka_formula(X: np.ndarray, Y: np.ndarray) -> float:
    """Kornblith et al. 2019, eq. for linear CKA in feature space."""
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


@pytest.mark.parametrize("n,f,g", [(40, 8, 12), (10, 200, 30)])  # narrow and wider than the images
def test_cka_equals_formula_and_is_invariant(n, f, g):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(n, f))
    Y = X @ rng.normal(size=(f, g)) + rng.normal(size=(n, g))
    ref = _cka_formula(X, Y)
    assert linear_cka(X, Y) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(X, X) == pytest.approx(1.0, rel=1e-12)
    Q = ortho_group.rvs(f, random_state=2)
    assert linear_cka(X @ Q, Y) == pytest.approx(ref, rel=1e-9)
    assert linear_cka(3.7 * X + 5.0, Y) == pytest.approx(ref, rel=1e-10)  # isotropic scale, translation
    assert cka(centered_gram(X), centered_gram(Y)) == pytest.approx(ref, rel=1e-10)


# ---- encoding ridge and noise ceiling ----------------------------------------------------------------
@pytest.mark.parametrize("n_features", [6, 80])  # primal (n > F) and dual (n < F) decompositions
def test_encode_equals_sklearn_ridge_with_grouped_cv_alphas(n_features):
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(3)
    n, V = 40, 5
    X, Xt = rng.normal(size=(n, n_features)), rng.normal(size=(7, n_features))
    Y = X[:, :3] @ rng.normal(size=(3, V)) * np.array([3, 1, 0.3, 0.1, 0.01]) + rng.normal(size=(n, V))
    groups = np.repeat(np.arange(20), 2)
    grid = [0.1, 10.0, 1000.0]
    cfg = EncodingConfig(alphas=grid, cv=4, backend="numpy", dtype="float64", voxels_batch=2)
    pred, chosen = encode(X, Y, Xt, groups, cfg)
    scores = np.zeros((len(grid), V))
    for tr, va in grouped_folds(groups, 4, 0):
        for k, a in enumerate(grid):
            P = Ridge(alpha=a).fit(X[tr], Y[tr]).predict(X[va])
            scores[k] += 1 - ((P - Y[va]) ** 2).sum(0) / ((Y[va] - Y[va].mean(0)) ** 2).sum(0)
    expected = np.array(grid)[np.argmax(scores, axis=0)]
    np.testing.assert_array_equal(chosen, expected)
    ref = np.stack([Ridge(alpha=a).fit(X, Y[:, v]).predict(Xt) for v, a in enumerate(expected)], axis=1)
    np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-6)


def test_flatten_grams_give_the_direct_encoding_rdm_and_cka(tmp_path, monkeypatch):
    """--features flatten from column-blocked Gram matrices equals the direct computation on the
    (images x tokens*channels) matrix (float32 tolerance), over several token blocks and
    standardisation chunks, on a one-row-chunk layer with a large common offset (as ViT layers have)."""
    rng = np.random.default_rng(7)
    n_rows, T, C, V = 60, 5, 6, 9
    latent = rng.normal(size=(n_rows, 3))
    layer = (latent @ rng.normal(size=(3, T * C)) + 0.5 * rng.normal(size=(n_rows, T * C)) + 20).reshape(n_rows, T, C)
    layer[:, :, 0] = 3.0  # constant columns: z-scored to 0 in both paths
    clip = zarr.open_group(tmp_path / "clip.zarr", mode="w")
    clip.create_array("layers/1", data=layer.astype(np.float16), chunks=(1, T, C))
    rows = np.sort(rng.choice(n_rows, 50, replace=False))
    test = np.zeros(len(rows), bool)
    test[rng.choice(len(rows), 12, replace=False)] = True
    pos_train, pos_test = np.flatnonzero(~test), np.flatnonzero(test)
    Y = latent[rows[pos_train]] @ rng.normal(size=(3, V)) + rng.normal(size=(len(pos_train), V))
    cfg = EncodingConfig(alphas=[1.0, 100.0, 1e4], cv=3, backend="numpy")
    monkeypatch.setattr(inputs, "STATS_COLUMNS", 4)  # standardisation chunks that split tokens
    flat = inputs.flatten_grams(clip, "1", rows, pos_train, pos_test, block_bytes=2 * len(rows) * C * 4)  # 3 blocks
    pred, chosen = encode_gram(flat.gram, pos_train, pos_test, Y, rows[pos_train], cfg)

    feats = inputs.layer_features(clip, "1", rows, "flatten", "all")
    X_train, X_test = standardize(feats[pos_train], feats[pos_test])
    ref_pred, ref_chosen = encode(X_train, Y, X_test, rows[pos_train], cfg)
    np.testing.assert_array_equal(chosen, ref_chosen)
    np.testing.assert_allclose(pred, ref_pred, rtol=1e-4, atol=1e-4 * np.abs(ref_pred).max())
    assert flat.n_features == T * C
    np.testing.assert_allclose(rdm_from_gram(flat.test_gram, flat.test_sums, flat.n_features), rdm(feats[pos_test]),
                               atol=1e-9)
    np.testing.assert_allclose(center_gram(flat.test_gram), centered_gram(feats[pos_test]),
                               atol=1e-8 * np.abs(centered_gram(feats[pos_test])).max())
    flat_one = inputs.flatten_grams(clip, "1", rows, pos_train, pos_test)  # one block: the same Gram
    np.testing.assert_allclose(flat_one.gram, flat.gram, rtol=1e-5, atol=1e-5 * np.abs(flat.gram).max())


def test_rdm_from_gram_treats_a_constant_row_as_uncorrelated():
    X = np.random.default_rng(8).normal(size=(6, 10)) + 100
    X[2] = 101.0
    np.testing.assert_allclose(rdm_from_gram(X @ X.T, X.sum(1), X.shape[1]), rdm(X), atol=1e-9)


def test_pearson_columns():
    rng = np.random.default_rng(4)
    P, Y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    Y[:, 3] = 1.0
    ref = [np.corrcoef(P[:, v], Y[:, v])[0, 1] for v in range(3)] + [0.0]
    np.testing.assert_allclose(pearson_columns(P, Y), ref, atol=1e-12)


def test_ncsnr_follows_nsd_definition():
    rng = np.random.default_rng(5)
    n_img, V = 400, 3
    ids = np.repeat(np.arange(n_img), 3)
    signal = rng.normal(size=(n_img, V)) * np.array([1.0, 0.5, 0.0])
    betas = signal[ids] + rng.normal(size=(len(ids), V))
    betas = (betas - betas.mean(0)) / betas.std(0)
    ss, df, n_rep = repeat_noise(betas, ids, block=2)
    snr = ncsnr(ss, df)
    noise_var = np.stack([betas[ids == i].var(0, ddof=1) for i in range(n_img)]).mean(0)  # NSD: mean over images
    np.testing.assert_allclose(snr, np.sqrt(np.maximum(0, 1 - noise_var)) / np.sqrt(noise_var), rtol=1e-10)
    assert n_rep == n_img
    np.testing.assert_allclose(snr[:2] ** 2, [1.0, 0.25], rtol=0.2)  # signal var / noise var
    assert snr[2] < 0.2
    # NSD's ceiling for A, B, C images averaging 3, 2, 1 trials
    counts = np.array([3] * 5 + [2] * 3 + [1] * 2)
    nc = noise_ceiling(snr, counts)
    np.testing.assert_allclose(nc, 100 * snr**2 / (snr**2 + (5 / 3 + 3 / 2 + 2 / 1) / 10))
    assert ncsnr(*repeat_noise(betas * 4 + 1, ids, zscored=False)[:2]) == pytest.approx(snr, rel=1e-10)
    # summed over splits with disjoint images (train, test), the pooled estimate is the same
    halves = [repeat_noise(betas[ids < 200], ids[ids < 200]), repeat_noise(betas[ids >= 200], ids[ids >= 200])]
    assert ncsnr(halves[0][0] + halves[1][0], halves[0][1] + halves[1][1]) == pytest.approx(snr, rel=1e-10)


def test_recommend_rule():
    layers = ["1", "2", "3", "4", "5", "6", "2-4_mean"]
    enc = {"low": dict(zip(layers, [0.1, 0.5, 0.9, 0.8, 0.6, 0.55, 0.9])),
           "high": dict(zip(layers, [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.4]))}
    sim = {a: {b: 1.0 if a == b else 0.5 for b in layers} for a in layers}
    cfg = RecommendConfig(low="low", high="high", cka_threshold=0.9)
    rec = recommend(layers, enc, sim, cfg)
    assert (rec["detail"], rec["semantic"], rec["half_max_range"]) == ("2-5", "6", "2-6")
    sim["5"]["6"] = 0.95  # block 5 looks like the final block and no ROI peaks there: cut
    assert recommend(layers, enc, sim, cfg)["detail"] == "2-4"
    enc["extra"] = dict(zip(layers, [0, 0, 0, 0, 1.0, 0, 0]))  # ...unless an area prefers it
    assert recommend(layers, enc, sim, cfg)["detail"] == "2-5"
    assert recommend(layers, enc, sim, RecommendConfig(low="nope"))["detail"] is None


# ---- the demo's planted hierarchy ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_stores(demo_fmri, demo_clip) -> dict[str, Path]:
    """Every block of the tiny ViT (analyze-layers scores all cached layers by default)."""
    return {"fmri": demo_fmri(), "trials": demo_fmri(repeats="trials"), "clip": demo_clip(layers="1,2,3,4,5,6")}


@pytest.fixture(scope="module")
def demo_result(demo_stores, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("align") / "alignment_subj01"
    result = analyze_layers(demo_stores["fmri"], demo_stores["clip"], out, fmri_trials=demo_stores["trials"],
                            progress=False)
    return result, out


def test_demo_planted_layers_are_the_best_layers(demo_result, demo_root):
    result, out = demo_result
    assert result["layers"] == BLOCKS
    # prf voxels are planted on block mid_block's tokens, floc voxels on encode_image (after block 6)
    mid = str(json.loads((demo_root / "demo/planted.json").read_text())["config"]["mid_block"])
    assert result["best_layer"]["prf-visualrois"] == mid
    assert result["best_layer"]["floc"] == "6"
    assert result["best_layer_rsa"]["prf-visualrois"] == mid
    assert result["recommended"]["semantic"] == "6"
    lo, hi = map(int, result["recommended"]["detail"].split("-"))
    assert lo <= int(mid) <= hi < 6
    assert {"prf-visualrois/V1v", "floc-faces", "floc", "nsdgeneral"} <= set(result["rois"])
    assert all(n >= 10 for n in result["n_voxels"].values())
    assert result["cka"]["1"]["6"] < 0.9  # the trained tower's blocks are distinguishable
    assert sorted(p.name for p in out.iterdir()) == ["alignment.json", "cka.png", "encoding.png", "plots", "rsa.png"]
    best = json.loads((out / "plots/best_layer.json").read_text())
    assert {"roi": "floc", "layer": "6", "block": 6.0} == {k: next(b for b in best if b["roi"] == "floc")[k]
                                                          for k in ("roi", "layer", "block")}


def test_demo_noise_ceiling_matches_the_planted_one(demo_result, demo_root):
    result, _ = demo_result
    noise = float(np.load(demo_root / "demo/planted.npz")["noise"])
    repeats = zarr.open_group(result["fmri"], mode="r")["test/n_repeats"][...]
    planted = 100 / (1 + noise**2 * np.mean(1 / repeats))  # signal share of the mean of each image's repeats
    assert result["noise_ceiling"]["prf-visualrois"] == pytest.approx(planted, abs=3)
    assert result["noise_ceiling"]["floc"] == pytest.approx(planted, abs=3)
    assert result["noise_ceiling"]["streams/lateral"] < 15  # not planted: noise only
    r, ceiling = result["encoding"]["floc"]["6"], result["noise_ceiling_r"]["floc"]
    assert result["encoding_normalized"]["floc"]["6"] == pytest.approx(r / ceiling, rel=1e-3)
    assert result["noise_ceiling_sources"] == [f"{result['fmri_trials']}:train", f"{result['fmri_trials']}:test"]


def test_encoding_and_rsa_have_intervals_and_each_best_layer_is_tested_against_its_neighbours(demo_result):
    result, _ = demo_result
    for roi, row in result["encoding_ci95"].items():
        for layer, (lo, hi) in row.items():
            assert lo <= hi and lo - 0.05 <= result["encoding"][roi][layer] <= hi + 0.05
    floc = result["best_layer_test"]["floc"]
    assert floc["best"] == "6" and set(floc["neighbours"]) == {"5"}  # the last block has one neighbour
    for roi, row in result["rsa_ci95"].items():
        for layer, (lo, hi) in row.items():
            assert lo <= result["rsa"][roi][layer] <= hi
    prf = result["best_layer_rsa_test"]["prf-visualrois"]
    assert prf["best"] == result["best_layer_rsa"]["prf-visualrois"] and len(prf["neighbours"]) == 2
    assert result["bootstrap"]["n"] == result["n_test_images"]


def test_a_per_trial_store_alone_gives_the_same_ceiling(demo_stores, demo_result, tmp_path):
    result, _ = demo_result
    alone = analyze_layers(demo_stores["trials"], demo_stores["clip"], tmp_path / "a", layers=["3", "6"],
                           rois=["floc"], progress=False)
    assert alone["layers"] == ["3", "6"] and alone["rois"][0] == "floc-faces"
    assert alone["noise_ceiling"]["floc"] == pytest.approx(result["noise_ceiling"]["floc"], abs=1e-4)
    assert alone["encoding"]["floc"]["6"] == pytest.approx(result["encoding"]["floc"]["6"], abs=1e-4)
    nc = analyze_layers(demo_stores["fmri"], demo_stores["clip"], tmp_path / "b", layers=["6"], rois=["floc"],
                        progress=False)
    assert nc["noise_ceiling"] is None and nc["encoding_normalized"] is None
    assert "--fmri-trials" in nc["noise_ceiling_method"]


# ---- bad input ---------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["analyze-layers", *args])
    return result.exit_code, result.output.strip()


def test_bad_input_is_one_line_and_leaves_nothing(demo_stores, tmp_path):
    fmri, clip = str(demo_stores["fmri"]), str(demo_stores["clip"])
    no_layers = _copy(demo_stores["clip"], tmp_path / "no_layers.zarr")
    shutil.rmtree(no_layers / "layers")
    partial = _copy(demo_stores["clip"], tmp_path / "partial.zarr")
    test_ids = zarr.open_group(fmri, mode="r")["test/image_ids"][:]
    done = zarr.open_array(partial / "shard_done", mode="r+")
    done[int(test_ids[0]) // done.attrs["shard_rows"]] = False
    few = _copy(demo_stores["fmri"], tmp_path / "few.zarr")
    g = zarr.open_group(few, mode="r+")
    betas, ids = g["test/betas"][:2], g["test/image_ids"][:2]
    del g["test"]
    g.create_array("test/betas", data=betas)
    g.create_array("test/image_ids", data=ids)
    out = tmp_path / "out"
    cases = [
        (["--fmri", fmri, "--clip", str(no_layers)], "no layers/* arrays"),
        (["--fmri", fmri, "--clip", str(partial)], "not extracted yet"),
        (["--fmri", fmri, "--clip", clip, "--rois", "prf-visualrois,V9"], "no ROI 'V9'"),
        (["--fmri", str(few), "--clip", clip], "2 test images"),
        (["--fmri", fmri, "--clip", clip, "--layers", "3,7"], "no layer '7'"),
        (["--fmri", fmri, "--clip", clip, "--features", "max"], "--features must be one of"),
        (["--fmri", fmri, "--clip", clip, "--fmri-trials", fmri], "holds one row per image"),
        (["--fmri", str(tmp_path / "none.zarr"), "--clip", clip], "fMRI cache not found"),
    ]
    for args, message in cases:
        code, output = _run([*args, "--out", str(out)])
        assert code == 1 and output.startswith("error:") and message in output, (args, output)
        assert len(output.splitlines()) == 1, output
        assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
