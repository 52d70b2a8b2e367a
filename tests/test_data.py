"""Training data read once: betas and targets in memory, token targets streamed by whole chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import pipeline.fitting.data as data_module
from pipeline.fitting.data import CacheDataset, iter_batches, target_statistics

DETAIL, SEMANTIC, TEXT = "layers/2-4_mean", "image_embeds", "text_embeds"
TARGETS = [DETAIL, SEMANTIC, TEXT]


@pytest.fixture(scope="module")
def stores(demo_fmri, demo_clip) -> tuple[zarr.Group, zarr.Group]:
    """Subject 1 per trial, and a CLIP cache in 16-row layer chunks (4 per 64-row shard)."""
    clip = demo_clip(layers="2-4:mean", shard_rows=64, chunk_rows=16)
    return zarr.open_group(demo_fmri(repeats="trials"), mode="r"), zarr.open_group(clip, mode="r")


def _chunk_bytes(array: zarr.Array, rows: np.ndarray) -> int:
    """Bytes of every chunk ``rows`` touch, whole: the least a reader of these rows decodes."""
    n = array.chunks[0]
    return len(np.unique(np.asarray(rows) // n)) * n * int(np.prod(array.shape[1:])) * array.dtype.itemsize


def _vector_bytes(clip: zarr.Group, ids: np.ndarray) -> int:
    n = len(np.unique(ids))
    return sum(n * int(np.prod(clip[t].shape[1:])) * clip[t].dtype.itemsize for t in (SEMANTIC, TEXT))


def test_everything_in_memory_is_read_once_and_matches_the_store(stores):
    fmri, clip = stores
    data = CacheDataset.from_stores(fmri, clip, TARGETS)
    ids = fmri["train/image_ids"][:]
    images = np.unique(ids)
    assert not data.bank.streamed and len(data.bank.images) == len(images) < len(ids)
    assert data.bank.decoded == sum(_chunk_bytes(clip[t], images) for t in TARGETS)
    before = data.bank.decoded
    rows = np.array([5, 0, 17, 5, len(ids) - 1])
    batch = data.__getitems__(rows)
    np.testing.assert_array_equal(batch["x"].numpy(), fmri["train/betas"][:][rows])
    np.testing.assert_array_equal(batch["image_id"].numpy(), ids[rows])
    for t in TARGETS:
        np.testing.assert_array_equal(batch["targets"][t].numpy(), clip[t][:][ids[rows]].astype(np.float32))
    for _ in iter_batches(data, 32, seed=1):
        pass
    assert data.bank.decoded == before  # nothing is decoded while training
    order = data.order(seed=1)
    assert sorted(order.tolist()) == list(range(len(data))) and (order != np.sort(order)).any()


def test_streamed_tokens_come_by_whole_blocks_each_decoded_once_per_epoch(stores, monkeypatch):
    fmri, clip = stores
    monkeypatch.setattr(data_module, "BLOCK_BYTES", 1)  # one 16-row chunk per block
    ids = fmri["train/image_ids"][:]
    memory = CacheDataset.from_stores(fmri, clip, TARGETS)
    data = CacheDataset.from_stores(fmri, clip, TARGETS, memory=_vector_bytes(clip, ids))
    assert sorted(data.bank.streamed) == [DETAIL] and sorted(data.bank.tables) == [SEMANTIC, TEXT]
    assert data.bank.n_blocks == len(np.unique(ids // 16)) > 3

    order = data.order(seed=3)
    blocks = data.bank.block_of_image[data.bank_rows[order]]
    runs = blocks[np.r_[True, blocks[1:] != blocks[:-1]]]
    assert len(runs) == len(set(runs.tolist())) == data.bank.n_blocks  # each block once, contiguous
    assert sorted(order.tolist()) == list(range(len(data)))

    start = data.bank.decoded
    seen = []
    for batch, (a, b) in zip(iter_batches(data, 24, seed=3), zip(range(0, len(order), 24), range(24, len(order) + 24, 24))):
        expected = memory.__getitems__(order[a:b])
        for t in TARGETS:
            assert torch.equal(batch["targets"][t], expected["targets"][t]), t
        seen.append(len(data.bank._held))
    assert data.bank.decoded - start == _chunk_bytes(clip[DETAIL], np.unique(ids))
    assert max(seen) <= data_module.HELD_BLOCKS


def test_statistics_count_each_image_once(stores):
    fmri, clip = stores
    data = CacheDataset.from_stores(fmri, clip, [DETAIL, TEXT])
    stats = target_statistics(data, [DETAIL], batch_size=7)
    rows = clip[DETAIL][:][np.unique(fmri["train/image_ids"][:])].astype(np.float64)
    np.testing.assert_allclose(stats[DETAIL][0].numpy(), rows.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats[DETAIL][1].numpy(), rows.std(0), rtol=1e-4, atol=1e-5)


def test_fingerprint_changes_with_the_data(stores, tmp_path: Path):
    fmri, clip = stores
    betas, ids = fmri["train/betas"][:], fmri["train/image_ids"][:]
    arrays = {t: clip[t][:] for t in TARGETS}
    base = CacheDataset(betas, ids, arrays, TARGETS).fingerprint()
    assert CacheDataset(betas.copy(), ids, arrays, TARGETS).fingerprint() == base
    other = betas.copy()
    other[3, 4] += 1e-3
    assert CacheDataset(other, ids, arrays, TARGETS).fingerprint()["betas"] != base["betas"]
    changed = {**arrays, SEMANTIC: arrays[SEMANTIC] * 2}
    found = CacheDataset(betas, ids, changed, TARGETS).fingerprint()["targets"]
    assert found[SEMANTIC] != base["targets"][SEMANTIC] and found[DETAIL] == base["targets"][DETAIL]


def test_training_on_streamed_tokens_is_deterministic(stores, monkeypatch):
    from pipeline.fitting.models import build_adapter
    from pipeline.fitting.train import train

    fmri, clip = stores
    monkeypatch.setattr(data_module, "BLOCK_BYTES", 1)
    config = {"detail_target": DETAIL, "width": 32, "depth": 1, "token_rank": 4}
    settings = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "patience": None, "progress": False}
    weights = []
    for _ in range(2):
        data = CacheDataset.from_stores(fmri, clip, [DETAIL, SEMANTIC], memory=0)  # everything streamed
        model = build_adapter("mclip", config, data, seed=0)
        result = train(model, data, settings)
        assert np.isfinite(result.history[-1]["val_loss"])
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
