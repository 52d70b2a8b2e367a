"""Video metrics against brute-force references (scikit-image PSNR, explicit loops for CLIP-pcc and the
n-way scores), and evaluate-video on the look-alike: a perfect reconstruction scores perfectly, the
ground truth is the cache's frames, VideoMAE runs with a tiny offline classifier or is unavailable."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from skimage.color import rgb2gray
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.decoding import video
from pipeline.errors import UserError
from pipeline.evaluation.metrics import ssim_each, two_way_identification
from pipeline.evaluation.video import evaluate_video_run, ground_truth
from pipeline.evaluation.video_metrics import clip_pcc, n_way_identification, n_way_top1_classification, psnr_each


def test_psnr_matches_scikit_image():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    rec = np.clip(gt.astype(int) + rng.integers(-30, 30, gt.shape), 0, 255).astype(np.uint8)
    ref = [peak_signal_noise_ratio(g / 255.0, r / 255.0, data_range=1.0) for g, r in zip(gt, rec)]
    np.testing.assert_allclose(psnr_each(gt, rec), ref, rtol=1e-10)
    assert np.isinf(psnr_each(gt[:1], gt[:1])[0])


def _frames(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return gt, np.clip(gt.astype(int) + rng.integers(-40, 40, gt.shape), 0, 255).astype(np.uint8)


def test_frame_scores_cross_batches_and_match_scikit_image_per_frame():
    gt, rec = _frames(70, 16)  # 70 frames: three conversion batches of 32, the last one partial
    g, r = gt / 255.0, rec / 255.0
    ref_psnr = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(g, r)]
    ref_ssim = [structural_similarity(rgb2gray(b), rgb2gray(a), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1.0) for a, b in zip(g, r)]
    np.testing.assert_allclose(psnr_each(gt, rec), ref_psnr, rtol=1e-10)
    np.testing.assert_allclose(ssim_each(gt, rec), ref_ssim, rtol=1e-10)
    with pytest.raises(UserError, match="differ in shape"):
        psnr_each(gt, rec[:-1])


@pytest.mark.parametrize("score", [psnr_each, ssim_each], ids=["psnr", "ssim"])
def test_frame_scores_peak_memory_does_not_grow_with_the_clip_count(score):
    """uint8 frames are converted to float64 a batch at a time: 8x more frames, about the same peak
    (converting all at once, the peak grew with the count: 16 float64 bytes per input byte)."""
    peaks = []
    for n in (64, 512):
        gt, rec = _frames(n, 24)
        tracemalloc.start()
        score(gt, rec)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks
    assert peaks[1] < 4 * gt.nbytes  # two whole float64 copies: 16 x gt.nbytes


def test_clip_pcc_is_the_mean_adjacent_cosine():
    e = np.random.default_rng(1).normal(size=(4, 6, 8))
    cos = [[e[v, f] @ e[v, f + 1] / np.linalg.norm(e[v, f]) / np.linalg.norm(e[v, f + 1]) for f in range(5)]
           for v in range(4)]
    assert clip_pcc(e) == pytest.approx(np.mean(cos), abs=1e-12)
    with pytest.raises(UserError, match="frames >= 2"):
        clip_pcc(e[:, :1])


def brute_n_way(gt, rec, n, trials, seed):
    rng = np.random.default_rng(seed)
    hits = 0
    for j in range(len(gt)):
        own = np.corrcoef(gt[j], rec[j])[0, 1]
        for _ in range(trials):
            others = rng.choice([i for i in range(len(gt)) if i != j], n - 1, replace=False)
            hits += all(np.corrcoef(gt[i], rec[j])[0, 1] < own for i in others)
    return hits / (len(gt) * trials)


def test_n_way_identification_matches_brute_force():
    rng = np.random.default_rng(2)
    gt = rng.normal(size=(12, 10))
    rec = gt + rng.normal(scale=1.5, size=gt.shape)
    for n in (2, 5):
        assert n_way_identification(gt, rec, n, trials=20, seed=3) == pytest.approx(brute_n_way(gt, rec, n, 20, 3))
    # n = all items: no sampling left; the fraction of reconstructions closest to their own ground truth
    corr = np.corrcoef(gt, rec)[:12, 12:]
    assert n_way_identification(gt, rec, 12, trials=3) == pytest.approx(np.mean(corr.argmax(0) == np.arange(12)))
    # n = 2 averages over random distractors what two-way identification counts over all of them
    assert n_way_identification(gt, rec, 2, trials=400) == pytest.approx(two_way_identification(gt, rec), abs=0.03)
    with pytest.raises(UserError, match="13-way identification needs 2 <= n <= 12"):
        n_way_identification(gt, rec, 13)


def test_n_way_classification_matches_brute_force():
    rng = np.random.default_rng(4)
    gt, rec = rng.dirichlet(np.ones(20), 15), rng.dirichlet(np.ones(20), 15)
    rec[:5] = gt[:5]  # a third reconstructed exactly
    r = np.random.default_rng(5)
    hits = 0
    for g, p in zip(gt, rec):
        truth = int(np.argmax(g))
        for _ in range(30):
            picked = r.choice([c for c in range(20) if c != truth], 9, replace=False)
            hits += p[truth] > p[picked].max()
    assert n_way_top1_classification(gt, rec, 10, trials=30, seed=5) == pytest.approx(hits / (15 * 30))


def write_perfect_run(run: Path, clip: Path, fmri: Path) -> Path:
    """A decode-video folder whose reconstructions are the ground-truth frames of the 50 test clips."""
    store = zarr.open_group(clip, mode="r")
    ids = zarr.open_group(fmri, mode="r")["test/clip_ids"][:]
    (run / "recon_video").mkdir(parents=True)
    for clip_id in ids:
        video.write_clip(run / "recon_video", int(clip_id), store["frames"][int(clip_id)], 3.0)
    (run / "decode.json").write_text(json.dumps({"method": "ground truth", "clip": str(clip),
                                                 "clip_ids": ids.tolist(), "frames_per_clip": 6}))
    return run


@pytest.fixture(scope="module")
def perfect_run(video_caches, tmp_path_factory) -> Path:
    return write_perfect_run(tmp_path_factory.mktemp("perfect"), video_caches["clip"], video_caches["fmri"])


def test_ground_truth_is_read_from_the_movies(video_caches):
    store = zarr.open_group(video_caches["clip"], mode="r")
    ids = np.array([230, 200, 201, 249])  # any order, with gaps
    np.testing.assert_array_equal(ground_truth(store, ids, 32), store["frames"].get_orthogonal_selection((ids,)))


def test_a_perfect_reconstruction_scores_perfectly(perfect_run):
    out = evaluate_video_run(perfect_run, videomae=None, trials=10)
    rec = out["reconstruction"]
    assert rec["SSIM"] == pytest.approx(1.0) and rec["PSNR"] == 100.0
    for key in ("CLIP 2-way (video)", "CLIP 50-way (video)", "CLIP 2-way (frame)", "CLIP 50-way (frame)"):
        assert rec[key] == 1.0, key
    assert rec["CLIP-pcc"] == pytest.approx(out["reference"]["CLIP-pcc of the ground truth"], abs=1e-6)
    assert set(out["unavailable"]) == {"VideoMAE 2-way", "VideoMAE 50-way"}
    assert out["ci95"]["reconstruction"]["CLIP 50-way (frame)"] == [1.0, 1.0]  # every resample is perfect too
    assert set(out["ci95"]["reconstruction"]) == set(rec) and out["bootstrap"]["n"] == 50
    assert json.loads((perfect_run / "metrics.json").read_text()) == out


def test_videomae_classification_with_tiny_offline_weights(perfect_run, tmp_path):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEImageProcessor

    cfg = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, num_labels=12)
    VideoMAEForVideoClassification(cfg).save_pretrained(tmp_path / "videomae")
    VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "videomae")
    out = evaluate_video_run(perfect_run, videomae=str(tmp_path / "videomae"), n_ways=(2, 50), trials=5)
    assert out["reconstruction"]["VideoMAE 2-way"] == 1.0 and out["reconstruction"]["VideoMAE 12-way"] == 1.0
    assert out["unavailable"] == {}
    missing = evaluate_video_run(perfect_run, videomae=str(tmp_path / "nowhere"), trials=5)
    assert "not found locally" in missing["unavailable"]["VideoMAE 2-way"]


def test_a_cache_made_from_a_config_file_rebuilds_its_model_or_degrades(video_root, video_caches, tmp_path,
                                                                          monkeypatch):
    import open_clip

    from pipeline.demo.video import DEMO_DESIGN
    from pipeline.features.clip import MODEL_CONFIG_DIR
    from pipeline.features.video import extract_video

    config = tmp_path / "configs/tiny-from-file.json"
    config.parent.mkdir()
    shutil.copy(MODEL_CONFIG_DIR / "nsd-tiny-vit.json", config)
    clip = extract_video(video_root, tmp_path / "clip.zarr", design=DEMO_DESIGN, model=str(config), layers="6:proj",
                         pretrained=str(video_root / "demo/nsd-tiny-vit.safetensors"), frame_size=32, progress=False)
    attrs = zarr.open_group(clip, mode="r").attrs
    assert attrs["model"] == "tiny-from-file" and attrs["model_source"] == str(config)
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, "tiny-from-file")  # as in a new process: name unknown
    run = write_perfect_run(tmp_path / "run", clip, video_caches["fmri"])
    out = evaluate_video_run(run, videomae=None, trials=5)
    assert out["reconstruction"]["CLIP 2-way (video)"] == 1.0 and "CLIP-pcc" in out["reconstruction"]

    config.unlink()  # the config file moved away: the CLIP metrics are unavailable, the rest is written
    out = evaluate_video_run(run, videomae=None, trials=5)
    clip_metrics = {"CLIP-pcc", "CLIP 2-way (video)", "CLIP 2-way (frame)", "CLIP 50-way (video)", "CLIP 50-way (frame)"}
    assert clip_metrics <= set(out["unavailable"]) and not clip_metrics & set(out["reconstruction"])
    assert "config file not found" in out["unavailable"]["CLIP-pcc"]
    assert out["reconstruction"]["SSIM"] == pytest.approx(1.0) and out["reconstruction"]["PSNR"] == 100.0
    assert json.loads((run / "metrics.json").read_text()) == out


def test_compare_pairs_two_video_runs_clip_by_clip(perfect_run, tmp_path):
    from pipeline.evaluation.compare import compare_runs

    same, worse = shutil.copytree(perfect_run, tmp_path / "same"), shutil.copytree(perfect_run, tmp_path / "worse")
    ids = json.loads((perfect_run / "decode.json").read_text())["clip_ids"]
    for clip_id in ids[:15]:  # 15 of the 50 clips reconstructed as their negative
        frames = video.read_clips(perfect_run / "recon_video", np.array([clip_id]), 6)[0]
        video.write_clip(worse / "recon_video", int(clip_id), 255 - frames, 3.0)
    for run in (perfect_run, same, worse):
        evaluate_video_run(run, videomae=None, trials=10)
    assert (same / "per_clip.npz").read_bytes() == (perfect_run / "per_clip.npz").read_bytes()
    result = compare_runs([perfect_run, same, worse], draws=300, permutations=2000)
    assert result["settings"]["unit"] == "test clip"
    itself, worse_rows = (c["metrics"] for c in result["comparisons"])
    assert all(r["difference"] == 0 and r["p"] == 1.0 for r in itself.values())
    for name in ("SSIM", "PSNR"):
        assert worse_rows[name]["difference"] < 0 and worse_rows[name]["ci95"][1] < 0 and worse_rows[name]["p_holm"] < 0.01
