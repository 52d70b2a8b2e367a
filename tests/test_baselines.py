"""The memorisation baselines against brute-force references on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation import baselines


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


@pytest.fixture
def bank() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(30, 3, 4))  # 30 cached rows of token targets


def test_nearest_training_image_is_the_best_training_row(bank):
    train = np.array([1, 4, 5, 9, 12, 20, 29])
    pred = np.random.default_rng(1).normal(size=(6, 3, 4))
    expected = train[_cos(pred, bank[train]).argmax(1)]
    np.testing.assert_array_equal(baselines.nearest_training(pred, bank, train), expected)


def test_category_prior_is_the_training_row_closest_to_the_training_mean(bank):
    train = np.array([0, 3, 7, 8, 15, 16, 22, 25])
    mean = bank[train].mean(0, keepdims=True)
    assert baselines.category_prior(bank, train, block=3) == train[_cos(mean, bank[train]).argmax()]


def test_overlap_quantiles_of_the_largest_cosine_to_training(bank):
    test, train = bank[:10, 0], bank[10:, 0]
    best = _cos(test, train).max(1)
    found = baselines.overlap(test, train)
    assert found["max_cosine_quantiles"]["q50"] == pytest.approx(np.median(best))
    assert found["max_cosine_quantiles"]["q00"] == pytest.approx(best.min())
    assert found["max_cosine_quantiles"]["q100"] == pytest.approx(best.max())
    assert found["mean"] == pytest.approx(best.mean())
