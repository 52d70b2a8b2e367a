"""The ridge adapter against scikit-learn and himalaya, its grouped folds, streaming, storage and errors."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import zarr
from sklearn.linear_model import Ridge, RidgeCV

from pipeline.errors import UserError
from pipeline.fitting.adapters import ridge_blocks
from pipeline.fitting.adapters.ridge import RidgeAdapter
from pipeline.fitting.adapters.ridge_blocks import stage_rows
from pipeline.fitting.adapters.ridge_solvers import grouped_folds

ALPHAS = np.logspace(-1, 4, 11)


def problem(n: int = 90, voxels: int = 25, shape: tuple[int, ...] = (3, 4), noise: float = 2.0, seed: int = 0):
    """Betas with an offset, targets = linear map + noise, and repeats of each image (groups)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, voxels)) + 1.5
    W = rng.standard_normal((voxels, int(np.prod(shape)))) * rng.uniform(0.05, 1, int(np.prod(shape)))
    Y = (X @ W + noise * rng.standard_normal((n, W.shape[1])) + 3).reshape(n, *shape)
    groups = np.arange(n) // 3
    return X, Y, groups


def flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("n, voxels", [(90, 25), (40, 60)])  # primal (n >= V) and dual (n < V)
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_matches_sklearn_ridge_at_one_alpha(backend: str, n: int, voxels: int, fit_intercept: bool) -> None:
    X, Y, groups = problem(n, voxels)
    Xtest = np.random.default_rng(1).standard_normal((7, voxels)) + 1.5
    model = RidgeAdapter(alphas=[7.0], cv=3, backend=backend, dtype="float64", fit_intercept=fit_intercept)
    model.fit(X, {"layers/8": Y, "image_embeds": Y[:, 0]}, groups=groups)
    for name, target in {"layers/8": Y, "image_embeds": Y[:, 0]}.items():
        ref = Ridge(alpha=7.0, fit_intercept=fit_intercept).fit(X, flat(target))
        scale = np.abs(ref.coef_).max()
        np.testing.assert_allclose(model.coef(name), ref.coef_, rtol=0, atol=2e-7 * scale)  # float32 storage
        np.testing.assert_allclose(model.intercept(name), ref.intercept_, rtol=1e-6, atol=1e-6)
        pred = model.predict(Xtest)[name]
        assert pred.shape == (7, *target.shape[1:])
        np.testing.assert_allclose(flat(pred), ref.predict(Xtest), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, voxels", [(120, 30), (45, 70)])
def test_alpha_per_target_matches_himalaya(n: int, voxels: int) -> None:
    himalaya = pytest.importorskip("himalaya.ridge")
    from himalaya.scoring import r2_score

    X, Y, groups = problem(n, voxels, shape=(4, 5))
    folds = grouped_folds(groups, 4, seed=3)
    ref = himalaya.RidgeCV(
        alphas=ALPHAS, cv=folds, fit_intercept=True, solver_params=dict(score_func=r2_score, warn=False)
    )
    ref.fit(X, flat(Y))
    model = RidgeAdapter(alphas=ALPHAS, cv=folds, alpha_per="target", dtype="float64").fit(X, {"t": Y})
    np.testing.assert_allclose(model.alpha("t"), ref.best_alphas_, rtol=1e-9)
    assert len(np.unique(model.alpha("t"))) > 1  # the check means something: alphas differ by column
    np.testing.assert_allclose(model.cv_score("t"), ref.cv_scores_, atol=1e-6)
    np.testing.assert_allclose(model.coef("t"), np.asarray(ref.coef_).T, atol=1e-6)
    np.testing.assert_allclose(model.intercept("t"), ref.intercept_, atol=1e-5)


def test_alpha_per_array_matches_sklearn_ridgecv() -> None:
    X, Y, groups = problem(shape=(3, 4))
    folds = grouped_folds(groups, 5, seed=0)
    ref = RidgeCV(alphas=ALPHAS, cv=folds).fit(X, flat(Y))
    model = RidgeAdapter(alphas=ALPHAS, cv=folds, alpha_per="array", dtype="float64").fit(X, {"t": Y}, groups=groups)
    assert model.targets_["t"]["alpha"] == pytest.approx(ref.alpha_, rel=1e-12)
    assert np.all(model.alpha("t") == model.targets_["t"]["alpha"])
    Xtest = X[:5] + 0.3
    np.testing.assert_allclose(flat(model.predict(Xtest)["t"]), ref.predict(Xtest), rtol=1e-5, atol=1e-5)


def test_alpha_per_token_is_sklearn_ridgecv_on_each_token() -> None:
    X, Y, groups = problem(shape=(4, 6), noise=4.0)
    folds = grouped_folds(groups, 3, seed=1)
    model = RidgeAdapter(alphas=ALPHAS, cv=folds, alpha_per="token", dtype="float64", n_targets_batch=12)
    model.fit(X, {"t": Y}, groups=groups)
    per_token = model.alpha("t").reshape(4, 6)
    for t in range(4):
        assert per_token[t, 0] == pytest.approx(RidgeCV(alphas=ALPHAS, cv=folds).fit(X, Y[:, t]).alpha_, rel=1e-12)
        assert np.all(per_token[t] == per_token[t, 0])


def test_grouped_folds_keep_groups_together_and_are_deterministic() -> None:
    groups = np.random.default_rng(0).integers(0, 40, 200)  # uneven repeats per image
    folds = grouped_folds(groups, 5, seed=7)
    assert len(folds) == 5
    vals = np.concatenate([val for _, val in folds])
    assert np.array_equal(np.sort(vals), np.arange(200))  # every row validated exactly once
    for train, val in folds:
        assert np.intersect1d(groups[train], groups[val]).size == 0
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(200))
    n_groups = [len(np.unique(groups[val])) for _, val in folds]
    assert max(n_groups) - min(n_groups) <= 1
    again = grouped_folds(groups, 5, seed=7)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = grouped_folds(groups, 5, seed=8)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_groups_stop_repeats_leaking_across_folds() -> None:
    """Pure-noise targets shown 3 times each: ungrouped CV rewards memorising the repeats."""
    rng = np.random.default_rng(0)
    X1, Y1 = rng.standard_normal((40, 60)), rng.standard_normal((40, 8))
    X = np.repeat(X1, 3, 0) + 0.01 * rng.standard_normal((120, 60))
    Y, groups = np.repeat(Y1, 3, 0), np.repeat(np.arange(40), 3)
    grouped = RidgeAdapter(alphas=ALPHAS, cv=4, dtype="float64").fit(X, {"t": Y}, groups=groups)
    leaky = RidgeAdapter(alphas=ALPHAS, cv=4, dtype="float64").fit(X, {"t": Y})
    assert grouped.cv_score("t").max() < 0.05 < leaky.cv_score("t").min()
    assert np.all(grouped.alpha("t") > leaky.alpha("t"))


class SpyArray:
    """A read-only array-like that records the size of every read (to prove reads are blocked)."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, index: tuple) -> np.ndarray:
        block = self.array[index]
        self.reads.append(block.size)
        return block


def test_streams_column_blocks_from_zarr_with_row_index(tmp_path) -> None:
    X, Y, groups = problem(n=60, shape=(9, 5))
    rng = np.random.default_rng(2)
    # the cache holds 200 images; each X row names its image (with repeats) through `rows`
    images = rng.choice(200, size=20, replace=False)
    rows = images[groups]
    cache = np.zeros((200, 9, 5), np.float16)
    cache[rows] = Y.astype(np.float16)
    store = zarr.open_group(tmp_path / "clip.zarr", mode="w", zarr_format=3)
    store.create_array("layers/4", data=cache, chunks=(32, 2, 5))
    spy = SpyArray(cache)
    kwargs = dict(alphas=ALPHAS, cv=3, dtype="float64")
    lazy = da.from_array(cache, chunks=(50, 3, 5))
    targets = {"zarr": store["layers/4"], "spy": spy, "dask": lazy}
    streamed = RidgeAdapter(**kwargs, n_targets_batch=12).fit(X, targets, groups=groups, rows=rows)
    whole = RidgeAdapter(**kwargs, n_targets_batch=10**6).fit(X, {"y": cache[rows].astype(np.float64)}, groups=groups)
    for name in targets:
        np.testing.assert_array_equal(streamed.alpha(name), whole.alpha("y"))
        np.testing.assert_allclose(streamed.coef(name), whole.coef("y"), rtol=1e-6, atol=1e-7)
    assert max(spy.reads) <= 20 * 10  # never more than one block: 20 distinct images x 2 tokens x 5
    assert len(spy.reads) == 5  # 9 tokens in blocks of 2 (12 columns rounded down to whole tokens)


def test_row_chunked_cache_is_staged_once_then_read_by_column_blocks(tmp_path, monkeypatch) -> None:
    """The CLIP cache chunks whole rows (all tokens): column blocks come from a staged copy."""
    X, Y, groups = problem(n=60, shape=(9, 5))
    rows = np.random.default_rng(3).choice(100, size=20, replace=False)[groups]
    cache = np.zeros((100, 9, 5), np.float32)
    cache[rows] = Y
    store = zarr.open_group(tmp_path / "clip.zarr", mode="w", zarr_format=3)
    store.create_array("layers/4", data=cache, chunks=(8, 9, 5))
    staged = []

    def spy(*args, **kwargs):
        array = stage_rows(*args, **kwargs)
        staged.append((array.chunks, array[...]))
        return array

    monkeypatch.setattr(ridge_blocks, "stage_rows", spy)
    kwargs = dict(alphas=ALPHAS, cv=3, dtype="float64")
    out = tmp_path / "adapter"
    model = RidgeAdapter(**kwargs, n_targets_batch=10).fit(
        X, {"t": store["layers/4"]}, groups=groups, rows=rows, out=out
    )
    whole = RidgeAdapter(**kwargs).fit(X, {"t": cache[rows]}, groups=groups)
    assert len(staged) == 1 and staged[0][0][1] == 2  # chunked by blocks of 2 tokens
    np.testing.assert_array_equal(staged[0][1], cache[np.unique(rows)])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "weights.safetensors"]  # staged copy removed
    np.testing.assert_array_equal(model.alpha("t"), whole.alpha("t"))
    np.testing.assert_allclose(model.coef("t"), whole.coef("t"), rtol=1e-6, atol=1e-7)


def test_save_load_reproduces_predictions_exactly(tmp_path) -> None:
    X, Y, groups = problem(shape=(3, 4))
    targets = {"layers/11-20:mean": Y, "image_embeds": Y[:, 1]}
    Xtest = X[::7] - 0.2
    direct = RidgeAdapter(alphas=ALPHAS, cv=3, coef_dtype="float16").fit(X, targets, groups=groups, out=tmp_path / "a")
    expected = direct.predict(Xtest)
    in_memory = RidgeAdapter(alphas=ALPHAS, cv=3, coef_dtype="float16").fit(X, targets, groups=groups)
    in_memory.save(tmp_path / "b")
    for path in ("a", "b"):
        loaded = RidgeAdapter.load(tmp_path / path)
        for name, pred in loaded.predict(Xtest).items():
            np.testing.assert_array_equal(pred, expected[name])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["params"]["coef_dtype"] == "float16"
    assert config["targets"]["image_embeds"]["shape"] == [4]
    counts = config["targets"]["layers/11-20:mean"]["alpha_counts"]
    assert sum(counts.values()) == 12 and all(float(a) in ALPHAS.astype(np.float64).tolist() for a in counts)
    from safetensors.numpy import load_file  # the weights are a standard safetensors file

    tensors = load_file(tmp_path / "a" / "weights.safetensors")
    assert tensors["coef/layers/11-20:mean"].dtype == np.float16
    np.testing.assert_array_equal(tensors["coef/image_embeds"], direct.coef("image_embeds"))
    np.testing.assert_array_equal(tensors["alpha/layers/11-20:mean"], direct.alpha("layers/11-20:mean"))


def test_rescale_is_brain_diffuser_standardisation() -> None:
    X, Y, groups = problem(shape=(2, 3))
    plain = RidgeAdapter(alphas=ALPHAS, cv=3).fit(X, {"t": Y}, groups=groups)
    rescaled = RidgeAdapter(alphas=ALPHAS, cv=3, rescale=True).fit(X, {"t": Y}, groups=groups)
    Xtest = np.random.default_rng(5).standard_normal((30, X.shape[1])) + 1.5
    P = flat(plain.predict(Xtest)["t"]).astype(np.float64)
    train = flat(Y)
    expected = (P - P.mean(0)) / P.std(0) * train.std(0) + train.mean(0)
    np.testing.assert_allclose(flat(rescaled.predict(Xtest)["t"]), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="at least 2 rows"):
        rescaled.predict(Xtest[:1])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda X, T, kw: X.__setitem__((3, 5), np.nan), "NaN/inf values in 1 voxel"),
        (lambda X, T, kw: T.__setitem__("t", T["t"][:-1]), "'t': 89 rows, but X has 90 rows"),
        (lambda X, T, kw: kw.__setitem__("alphas", []), "alpha grid is empty"),
        (lambda X, T, kw: kw.__setitem__("alphas", [1.0, -2.0]), "must be positive"),
        (lambda X, T, kw: T["t"].__setitem__((0, 0, 0), np.inf), "'t': NaN/inf values"),
        (lambda X, T, kw: kw.__setitem__("cv", 31), "31 folds need between 2 and 30"),
        (lambda X, T, kw: kw.__setitem__("alpha_per", "layer"), "alpha_per: 'layer' is not one of"),
        (lambda X, T, kw: T.clear(), "no target arrays"),
        (lambda X, T, kw: kw.__setitem__("backend", "tpu"), "backend: 'tpu' is not one of auto, numpy, torch"),
        (lambda X, T, kw: kw.__setitem__("groups", np.arange(89)), "groups: expected 90 labels"),
    ],
)
def test_bad_input_is_one_clear_user_error(change, message: str) -> None:
    X, Y, groups = problem()
    targets, kwargs = {"t": Y.copy()}, {"alphas": ALPHAS, "cv": 3, "groups": groups}
    change(X, targets, kwargs)
    groups = kwargs.pop("groups")
    with pytest.raises(UserError, match=message):
        RidgeAdapter(**kwargs).fit(X, targets, groups=groups)


def test_bad_input_at_predict_and_load(tmp_path) -> None:
    X, Y, groups = problem()
    with pytest.raises(UserError, match="rows index up to 95, but it has 90 rows"):
        RidgeAdapter(alphas=ALPHAS).fit(X, {"t": Y}, rows=np.arange(90) + 6)
    model = RidgeAdapter(alphas=ALPHAS, cv=3).fit(X, {"t": Y}, groups=groups, out=tmp_path / "m")
    with pytest.raises(UserError, match="24 voxels, but the adapter was fitted on 25"):
        model.predict(X[:, :-1])
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(UserError, match="not a complete ridge adapter"):
        RidgeAdapter.load(tmp_path / "m")
