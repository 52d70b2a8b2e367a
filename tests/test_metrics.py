"""Metrics against independent computations: numpy Pearson, scikit-image SSIM, brute-force two-way
identification and retrieval; the 'unavailable' path and a test stand-in network for evaluate()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.spatial.distance
import torch
import torch.nn.functional as F
import zarr
from skimage.metrics import structural_similarity
from torch import nn

from pipeline.errors import UserError
from pipeline.evaluation import metrics as M


@pytest.fixture
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    noise = rng.integers(-60, 60, gt.shape)
    rec = np.clip(gt.astype(int) + noise, 0, 255).astype(np.uint8)
    return gt, rec


# ---- PixCorr / SSIM ------------------------------------------------------------------------------------
def test_pixcorr_matches_numpy_corrcoef(images):
    gt, rec = images
    expected = np.mean([np.corrcoef(g.ravel() / 255, r.ravel() / 255)[0, 1] for g, r in zip(gt, rec)])
    assert M.pixcorr(gt, rec) == pytest.approx(expected, abs=1e-12)
    assert M.pixcorr(gt / 255.0, rec / 255.0) == pytest.approx(expected, abs=1e-12)  # float input, same value
    assert M.pixcorr(gt, gt) == pytest.approx(1.0)


def test_pixcorr_constant_image_counts_as_zero(images):
    gt, rec = images
    rec = rec.copy()
    rec[0] = 0  # a blank reconstruction (e.g. a safety-filtered one)
    each = M.pixcorr_each(gt, rec)
    assert each[0] == 0.0
    assert M.pixcorr(gt, rec) == pytest.approx(each.mean())
    assert np.all(np.isfinite(each))


def test_ssim_is_2d_grayscale_ssim_of_scikit_image(images):
    gt, rec = images
    weights = np.array([0.2125, 0.7154, 0.0721])  # rgb2gray's luma, written out independently
    expected = np.mean([
        structural_similarity((r / 255) @ weights, (g / 255) @ weights, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for g, r in zip(gt, rec)
    ])
    assert M.ssim(gt, rec) == pytest.approx(expected, abs=1e-10)
    assert M.ssim(gt, gt) == pytest.approx(1.0)


def test_ssim_of_constant_images_is_finite():
    flat = np.full((2, 16, 16, 3), 128, np.uint8)
    other = np.full((2, 16, 16, 3), 30, np.uint8)
    assert M.ssim(flat, flat) == pytest.approx(1.0)
    assert 0 < M.ssim(flat, other) < 1


def test_image_shape_errors(images):
    gt, rec = images
    with pytest.raises(UserError, match="differ in shape"):
        M.pixcorr(gt, rec[:, :20])
    with pytest.raises(UserError, match=r"\(N, H, W, 3\)"):
        M.ssim(gt[..., 0], rec[..., 0])


# ---- two-way identification / correlation distance ---------------------------------------------------
def brute_two_way(gt: np.ndarray, rec: np.ndarray) -> float:
    """ME's definition written as loops: per recon j, the share of other GTs i with r(GT_i, rec_j) < r(GT_j, rec_j)."""
    n = len(gt)
    g, r = gt.reshape(n, -1), rec.reshape(n, -1)
    scores = []
    for j in range(n):
        own = np.corrcoef(g[j], r[j])[0, 1]
        wins = sum(np.corrcoef(g[i], r[j])[0, 1] < own for i in range(n) if i != j)
        scores.append(wins / (n - 1))
    return float(np.mean(scores))


def test_two_way_identification_matches_brute_force():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(12, 3, 5))
    rec = gt + rng.normal(scale=2.0, size=gt.shape)
    value = M.two_way_identification(gt, rec)
    assert value == pytest.approx(brute_two_way(gt, rec), abs=1e-12)
    assert 0.5 < value < 1.0
    assert M.two_way_identification(gt, gt) == 1.0


def test_two_way_identification_ties_and_constant_features_fail():
    rng = np.random.default_rng(2)
    gt = rng.normal(size=(4, 10))
    gt[1] = gt[0]  # two identical ground truths: recon 0 and 1 tie with each other's GT
    rec = gt.copy()
    # recon 0 and 1 each beat GTs 2 and 3 but tie with the duplicate: 2/3 each; 2 and 3 are perfect
    assert M.two_way_identification(gt, rec) == pytest.approx((2 / 3 + 2 / 3 + 1 + 1) / 4)
    rec[3] = 5.0  # constant recon features: undefined correlations count as failures
    with np.errstate(invalid="ignore", divide="ignore"):
        assert M.two_way_identification(gt, rec) == pytest.approx(brute_two_way(gt, rec))
    with pytest.raises(UserError, match="at least 2"):
        M.two_way_identification(gt[:1], rec[:1])


def test_correlation_distance_matches_scipy():
    rng = np.random.default_rng(3)
    gt, rec = rng.normal(size=(7, 20)), rng.normal(size=(7, 20))
    expected = np.mean([scipy.spatial.distance.correlation(g, r) for g, r in zip(gt, rec)])
    assert M.correlation_distance(gt, rec) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(UserError, match="differ in shape"):
        M.correlation_distance(gt, rec[:, :5])


# ---- retrieval -----------------------------------------------------------------------------------------
def brute_retrieval(brain: np.ndarray, image: np.ndarray, pool: int, draws: int, seed: int) -> tuple[float, float]:
    """ME2's notebook loop with the global NumPy seed; 'correct' = own pair strictly most similar."""
    np.random.seed(seed)
    n = len(brain)
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    fwd, bwd = [], []
    for _ in range(draws):
        s = np.random.choice(np.arange(n), size=pool, replace=False)
        b, im = brain[s].reshape(pool, -1), image[s].reshape(pool, -1)
        fwd.append(np.mean([all(cos(im[i], b[i]) > cos(im[i], b[j]) for j in range(pool) if j != i) for i in range(pool)]))
        bwd.append(np.mean([all(cos(b[i], im[i]) > cos(b[i], im[j]) for j in range(pool) if j != i) for i in range(pool)]))
    return float(np.mean(fwd)), float(np.mean(bwd))


def test_retrieval_matches_brute_force():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(40, 2, 4))
    brain = image + rng.normal(scale=1.5, size=image.shape)
    got = M.retrieval_top1(brain, image, pool=15, draws=5, seed=42)
    expected = brute_retrieval(brain, image, 15, 5, 42)
    assert got.image_to_brain == pytest.approx(expected[0])
    assert got.brain_to_image == pytest.approx(expected[1])
    assert tuple(M.retrieval_top1(image, image, pool=15, draws=3)) == (1.0, 1.0)


def test_retrieval_orientation_and_ties():
    image = np.array([[1.0, 0.0], [0.0, 1.0]])
    brain = np.array([[1.0, 0.0], [1.0, 0.1]])
    # rows = images: each image's own brain row is its best match; brain 1 prefers image 0
    got = M.retrieval_top1(brain, image, pool=2, draws=1)
    assert got == M.Retrieval(image_to_brain=1.0, brain_to_image=0.5)
    tied = np.array([[1.0, 0.0], [1.0, 0.0]])  # two identical brain rows: every image row ties, ties fail
    assert M.retrieval_top1(tied, image, pool=2, draws=1) == (0.0, 0.5)


def test_retrieval_errors():
    x = np.zeros((10, 4))
    with pytest.raises(UserError, match="pool must be between 2 and the number of test samples \\(10\\)"):
        M.retrieval_top1(x, x, pool=300)
    with pytest.raises(UserError, match="one row per test sample"):
        M.retrieval_top1(x, x[:9], pool=5)
    with pytest.raises(UserError, match="values per row"):
        M.retrieval_top1(x, x[:, :3], pool=5)


# ---- prediction quality ------------------------------------------------------------------------------------
def test_prediction_quality_matches_numpy(tmp_path: Path):
    rng = np.random.default_rng(5)
    true = rng.normal(size=(9, 6, 4)).astype(np.float32)
    pred = true + rng.normal(size=true.shape).astype(np.float32)
    true[:, 0, 0] = 1.0  # a constant column counts as r = 0
    t2, p2 = true.reshape(9, -1).astype(np.float64), pred.reshape(9, -1).astype(np.float64)
    rs = [0.0 if t2[:, c].std() == 0 else np.corrcoef(p2[:, c], t2[:, c])[0, 1] for c in range(t2.shape[1])]
    cos = [p @ t / np.linalg.norm(p) / np.linalg.norm(t) for p, t in zip(p2, t2)]
    got = M.prediction_quality(pred, true)
    assert got["pearson_r"] == pytest.approx(np.mean(rs), abs=1e-10)
    assert got["cosine"] == pytest.approx(np.mean(cos), abs=1e-10)
    # lazy zarr arrays, read in blocks of one token (4 values per row)
    zp = zarr.create_array(tmp_path / "p.zarr", shape=pred.shape, chunks=(9, 2, 4), dtype="float32")
    zt = zarr.create_array(tmp_path / "t.zarr", shape=true.shape, chunks=(9, 2, 4), dtype="float32")
    zp[...], zt[...] = pred, true
    blocked = M.prediction_quality(zp, zt, max_values=9 * 4)
    assert blocked["pearson_r"] == pytest.approx(got["pearson_r"], abs=1e-10)
    assert blocked["cosine"] == pytest.approx(got["cosine"], abs=1e-10)
    with pytest.raises(UserError, match="must be equal"):
        M.prediction_quality(pred, true[:, :3])


# ---- evaluate: unavailable networks, a stand-in network ----------------------------------------------------
class TinyNet(nn.Sequential):
    """Test stand-in: a random two-layer CNN. Never a real metric."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten())


def test_evaluate_reports_missing_weights_as_unavailable(images):
    gt, rec = images
    result = M.evaluate(gt, rec, brain=gt.reshape(6, -1)[:, :8].astype(float), image=rec.reshape(6, -1)[:, :8].astype(float))
    for name in ("AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP", "EffNet-B", "SwAV"):
        assert set(result[name]) == {"unavailable"}, name
    assert "alexnet-owt-7be5be79.pth" in result["AlexNet(2)"]["unavailable"]
    assert "swav_800ep_pretrain.pth.tar" in result["SwAV"]["unavailable"]
    assert "vit_large_patch14_clip_224.openai" in result["CLIP"]["unavailable"]
    assert "pool of 300 is larger than the 6 test images" in result["retrieval_image_to_brain"]["unavailable"]
    json.dumps(result)  # a metrics file can be written as is
    with pytest.raises(UserError, match=r"unknown network \['alexnt'\]"):
        M.evaluate(gt, rec, weights={"alexnt": "x.pth"})

    # PixCorr/SSIM follow the protocol: both to 256, then 425, bilinear without antialias
    def chain(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x / 255.0).permute(0, 3, 1, 2)
        for size in (256, 425):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        return t.permute(0, 2, 3, 1).numpy()

    g, r = chain(gt), chain(rec)
    assert result["PixCorr"] == pytest.approx(M.pixcorr(g, r), abs=1e-6)
    assert result["SSIM"] == pytest.approx(M.ssim(g, r), abs=1e-5)


def test_evaluate_with_a_stand_in_network(images):
    gt, rec = images
    net = M.FeatureNet("test-stand-in", lambda path: TinyNet().eval(), size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    stand_ins = (
        M.FeatureMetric("test-stand-in(conv)", net, "1", "two_way"),
        M.FeatureMetric("test-stand-in(out)", net, None, "correlation_distance"),
    )
    brain = np.random.default_rng(6).normal(size=(6, 5))
    result = M.evaluate(gt, rec, metrics=stand_ins, brain=brain, image=brain, pool=6, draws=2)
    assert not any(name in result for name in ("AlexNet(2)", "CLIP", "SwAV"))

    def features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(x / 255.0).float().permute(0, 3, 1, 2)
        for size in (256, 32):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        model = TinyNet().eval()
        with torch.no_grad():
            hidden = model[1](model[0]((t - 0.5) / 0.25))
            return hidden.flatten(1).numpy(), model(((t - 0.5) / 0.25)).numpy()

    (hg, og), (hr, orr) = features(gt), features(rec)
    assert result["test-stand-in(conv)"] == pytest.approx(brute_two_way(hg, hr), abs=1e-9)
    assert result["test-stand-in(out)"] == pytest.approx(
        np.mean([scipy.spatial.distance.correlation(a, b) for a, b in zip(og, orr)]), abs=1e-5
    )
    assert result["retrieval_image_to_brain"] == result["retrieval_brain_to_image"] == 1.0


def test_feature_nodes_of_the_real_architectures():
    """ME's node names exist and give the documented sizes (random weights: shapes only, no metric)."""
    import torchvision

    x = torch.rand(2, 3, 256, 256)
    feats = M.extract_features(torchvision.models.alexnet(), M.ALEXNET, ["features.4", "features.11"], x)
    assert feats["features.4"].shape == (2, 192 * 31 * 31)
    assert feats["features.11"].shape == (2, 256 * 15 * 15)


def test_weights_found_in_cache_but_wrong_are_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = M.torch_hub_checkpoint("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
    assert ckpt == tmp_path / "torch/hub/checkpoints/alexnet-owt-7be5be79.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, ckpt)
    with pytest.raises(M.MetricUnavailable, match="does not fit torchvision alexnet"):
        M.ALEXNET.load(None)
    with pytest.raises(M.MetricUnavailable, match="not found at .*nope.pth"):
        M.EFFNET.load(tmp_path / "nope.pth")

    # open_clip's cache entry for OpenAI ViT-L/14 is found in the Hugging Face cache layout
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf/models--timm--vit_large_patch14_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("abc123")
    (repo / "snapshots/abc123").mkdir(parents=True)
    (repo / "snapshots/abc123/open_clip_pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(M.MetricUnavailable, match="cannot read checkpoint .*open_clip_pytorch_model.bin"):
        M.OPENAI_CLIP.load(None)
