"""Bootstrap intervals: nominal coverage on simulated data, pool statistics against brute force,
determinism, and the byte-reproducible per-image file."""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
import pytest
from scipy.stats import norm

from pipeline.evaluation import bootstrap as B
from pipeline.evaluation import intervals
from pipeline.evaluation import metrics as M


def test_mean_interval_covers_the_true_mean_at_its_nominal_rate():
    rng = np.random.default_rng(1)
    hits = 0
    for sim in range(100):
        scores = rng.beta(2, 3, size=120)  # true mean 0.4, skewed like SSIM/PixCorr
        lo, hi = B.mean_interval(scores, draws=500, seed=sim)["ci95"]
        hits += lo <= 0.4 <= hi
    assert 0.90 <= hits / 100 <= 0.99


def test_pool_interval_covers_the_true_two_way_accuracy():
    """fail[i, j] = d_i >= q_j with q ~ N(1, 1), d ~ N(0, 1): the two-way accuracy is P(d < q) = Phi(1/sqrt 2)."""
    truth = norm.cdf(1 / np.sqrt(2))
    rng = np.random.default_rng(2)
    hits = 0
    for sim in range(100):
        q, d = rng.normal(1, 1, 100), rng.normal(0, 1, 100)
        fail = d[:, None] >= q[None, :]
        draws = B.pool_draws(fail, 2, B.resample_weights(100, 500, sim))
        lo, hi = B.percentile_ci(draws)
        hits += lo <= truth <= hi
    assert 0.90 <= hits / 100 <= 0.99


def test_pool_scores_equal_brute_force_over_every_pool():
    rng = np.random.default_rng(3)
    gt, rec = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    fail = M.two_way_failures(gt, rec)
    assert B.pool_scores(fail, 2).mean() == pytest.approx(M.two_way_identification(gt, rec))
    n, pool = 7, 4
    for j in range(n):  # per item: the fraction of all (pool - 1)-subsets of the others with no failure
        others = [i for i in range(n) if i != j]
        wins = sum(not fail[list(s), j].any() for s in combinations(others, pool - 1))
        assert B.pool_scores(fail, pool)[j] == pytest.approx(wins / comb(n - 1, pool - 1))


def test_retrieval_failures_give_the_expectation_of_the_monte_carlo_protocol():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(40, 8))
    brain = image + rng.normal(scale=1.5, size=image.shape)
    fwd, bwd = M.retrieval_failures(brain, image)
    mc = M.retrieval_top1(brain, image, pool=10, draws=3000, seed=0)
    assert B.pool_scores(fwd, 10).mean() == pytest.approx(mc.image_to_brain, abs=0.01)
    assert B.pool_scores(bwd, 10).mean() == pytest.approx(mc.brain_to_image, abs=0.01)


def test_pool_draws_with_unit_weights_is_the_full_set_value():
    rng = np.random.default_rng(5)
    fail = rng.random((30, 30)) < 0.3
    ones = np.ones((1, 30))
    assert B.pool_draws(fail, 5, ones)[0] == pytest.approx(B.pool_scores(fail, 5).mean())


def test_intervals_are_identical_for_a_fixed_seed_and_move_with_it():
    scores = np.random.default_rng(6).random(50)
    assert B.mean_interval(scores, seed=3) == B.mean_interval(scores, seed=3)
    assert B.mean_interval(scores, seed=3)["ci95"] != B.mean_interval(scores, seed=4)["ci95"]


def test_per_image_file_round_trips_and_is_byte_reproducible(tmp_path):
    rng = np.random.default_rng(7)
    per = {"subj01": {"SSIM": {"scores": rng.random(6)}, "CLIP": {"fail": rng.random((6, 6)) < 0.5, "pool": 2}},
           "subj02": {"SSIM": {"scores": rng.random(6)}}}
    ids = {"subj01": np.arange(6), "subj02": np.arange(6) + 10}
    a = intervals.write_per_image(tmp_path / "a.npz", intervals.flatten(per, ids))
    b = intervals.write_per_image(tmp_path / "b.npz", intervals.flatten(per, ids))
    assert a.read_bytes() == b.read_bytes()
    got_ids, got = intervals.read_per_image(a)
    assert np.array_equal(got_ids["subj02"], ids["subj02"])
    assert np.array_equal(got["subj01"]["CLIP"]["fail"], per["subj01"]["CLIP"]["fail"])
    assert got["subj01"]["CLIP"]["pool"] == 2
    assert np.array_equal(got["subj01"]["SSIM"]["scores"], per["subj01"]["SSIM"]["scores"])


def test_video_n_way_expectations_match_their_monte_carlo_protocols():
    from pipeline.evaluation.video import videomae_scores
    from pipeline.evaluation.video_metrics import n_way_identification, n_way_top1_classification

    rng = np.random.default_rng(8)
    gt = rng.normal(size=(30, 6))
    rec = gt + rng.normal(scale=1.2, size=gt.shape)
    expected = B.pool_scores(M.two_way_failures(gt, rec), 5).mean()
    assert expected == pytest.approx(n_way_identification(gt, rec, 5, trials=2000), abs=0.01)
    p_gt, p_rec = rng.dirichlet(np.ones(12), 30), rng.dirichlet(np.ones(12), 30)
    assert videomae_scores(p_gt, p_rec, 4).mean() == pytest.approx(
        n_way_top1_classification(p_gt, p_rec, 4, trials=2000), abs=0.01)


def test_pearson_draws_with_unit_weights_are_pearson_and_resample_consistently():
    from pipeline.analysis.encoding import pearson_columns

    rng = np.random.default_rng(9)
    y = rng.normal(size=(40, 5))
    good, worse = y + rng.normal(scale=0.5, size=y.shape), y + rng.normal(scale=2.0, size=y.shape)
    np.testing.assert_allclose(B.pearson_draws(good, y, np.ones((1, 40)))[0], pearson_columns(good, y), atol=1e-10)
    w = B.resample_weights(40, 300, 0)
    idx = np.repeat(np.arange(40), w[0].astype(int))  # draw 0 as explicit rows
    np.testing.assert_allclose(B.pearson_draws(good, y, w)[0], pearson_columns(good[idx], y[idx]), atol=1e-10)
    test = B.paired_difference(B.pearson_draws(good, y, w).mean(1), B.pearson_draws(worse, y, w).mean(1))
    assert test["better"] and test["p"] < 0.01


def test_rdm_spearman_draws_are_close_to_rsa_of_the_resampled_conditions():
    """Brute force: materialise each resampled set of conditions, drop pairs of copies of one condition
    (equal up to re-ranking in the resample, which the draws skip; exact with unit weights)."""
    from scipy.stats import spearmanr

    from pipeline.analysis.rsa import rdm, rsa

    rng = np.random.default_rng(7)
    X = rng.normal(size=(40, 5))
    Y = np.round(X @ rng.normal(size=(5, 4)) + rng.normal(size=(40, 4)), 1)  # rounded: tied distances too
    Y[3] = Y[5]
    w = B.resample_weights(40, draws=12, seed=3)
    got = B.rdm_spearman_draws(rdm(X), rdm(Y), w)
    for draw, weights in zip(got, w):
        idx = np.repeat(np.arange(40), weights.astype(int))
        a, b = np.triu_indices(len(idx), 1)
        keep = idx[a] != idx[b]
        full_x = 1 - np.corrcoef(X[idx])[a, b]
        full_y = 1 - np.corrcoef(Y[idx])[a, b]
        assert draw == pytest.approx(spearmanr(full_x[keep], full_y[keep])[0], abs=0.02)
    assert B.rdm_spearman_draws(rdm(X), rdm(Y), np.ones((1, 40)))[0] == pytest.approx(rsa(rdm(X), rdm(Y)), abs=1e-12)


def test_rdm_spearman_interval_covers_the_population_rsa():
    """Conditions drawn from one population: the interval over them covers the RSA of a very large draw."""
    rng = np.random.default_rng(2)
    M = rng.normal(size=(4, 6))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        X = rng.normal(size=(n, 4))
        return X, X @ M + 1.5 * rng.normal(size=(n, 6))

    from pipeline.analysis.rsa import rdm, rsa

    truth = rsa(*(rdm(a) for a in sample(700)))
    hits = 0
    for sim in range(100):
        X, Y = sample(40)
        lo, hi = B.percentile_ci(B.rdm_spearman_draws(rdm(X), rdm(Y), B.resample_weights(40, 200, sim)))
        hits += lo <= truth <= hi
    assert 0.90 <= hits / 100 <= 0.99


def test_zero_shot_hits_average_to_the_accuracy_and_unlabelled_images_leave_the_draws():
    from pipeline.evaluation.zeroshot import zero_shot_accuracy

    rng = np.random.default_rng(5)
    pred, classes = rng.normal(size=(30, 8)), rng.normal(size=(6, 8))
    labels = rng.random((30, 6)) < 0.3
    labels[:4] = False  # four images without a category
    hits: dict = {}
    found = zero_shot_accuracy(pred, classes, labels, topk=(1, 5), hits=hits)
    assert np.isnan(hits["top1"][:4]).all() and np.nanmean(hits["top5"]) == found["top5"]
    w = B.resample_weights(30, draws=5, seed=1)
    expected = [np.mean(np.repeat(hits["top1"], row.astype(int))[~np.isnan(np.repeat(hits["top1"], row.astype(int)))])
                for row in w]
    np.testing.assert_allclose(B.mean_draws(hits["top1"], w), expected)
