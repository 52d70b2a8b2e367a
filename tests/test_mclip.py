"""BrainMCLIP and Lite-Mind on the demo: losses against numpy references, learning the planted model,
exact reload, and clear errors for bad input.

The caches are conftest's session caches of the demo (tiny ViT). The demo plants prf-visualrois voxels
on block-3 tokens and floc-* voxels on the final embedding; the detail target ``layers/2-4_mean``
contains block 3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import UserError
from pipeline.evaluation.metrics import retrieval_top1
from pipeline.fitting.adapters.base import FLOC, roi_indices
from pipeline.fitting.adapters.litemind import FrequencyBlock, drop_path
from pipeline.fitting.adapters.losses import caption_mean, info_nce, token_cosine
from pipeline.fitting.data import CacheDataset, split_by_image, target_statistics
from pipeline.fitting.models import adapter_targets, build_adapter, load_adapter, predict, save_adapter
from pipeline.fitting.train import train

DETAIL, SEMANTIC, TEXT = "layers/2-4_mean", "image_embeds", "text_embeds"
TINY_MCLIP = {"detail_target": DETAIL, "text_target": TEXT, "width": 64, "depth": 1, "token_rank": 8}
TINY_LITEMIND = {"targets": [DETAIL, SEMANTIC], "patch_size": 32, "dims": [64, 32], "depths": [1, 1],
                 "mlp_ratio": 2.0, "drop_path": 0.1, "temperature": 0.05}  # e^-8 (paper) needs real-size data
FAST = {"epochs": 30, "batch_size": 16, "lr": 3e-3, "patience": None, "progress": False}


@pytest.fixture(scope="module")
def caches(demo_fmri, demo_clip) -> tuple[zarr.Group, zarr.Group]:
    """The demo's subject 1 and its CLIP cache (extract-clip of the tiny ViT: layers 2-4:mean and 6)."""
    return zarr.open_group(demo_fmri(), mode="r"), zarr.open_group(demo_clip(), mode="r")


def true_rows(clip: zarr.Group, name: str, ids: np.ndarray) -> np.ndarray:
    rows = clip[name][...][ids].astype(np.float32)
    if name == TEXT:  # the caption target is each image's mean present caption
        present = np.abs(rows).sum(-1) > 0
        rows = (rows * present[..., None]).sum(1) / present.sum(1, keepdims=True)
    return rows


@pytest.fixture(scope="module")
def trained(caches) -> dict:
    """One tiny mclip (with the text branch) and one tiny litemind, trained on the demo's subject 1."""
    fmri, clip = caches
    out = {}
    for method, config in (("mclip", TINY_MCLIP), ("litemind", TINY_LITEMIND)):
        targets = adapter_targets(method, config)
        data = CacheDataset.from_stores(fmri, clip, targets)
        model = build_adapter(method, config, data, seed=0)
        out[method] = (model, train(model, data, FAST), targets)
    return out


# ---- losses and metric against numpy -------------------------------------------------------------
def test_info_nce_matches_numpy_reference():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=(6, 3, 4)), rng.normal(size=(6, 3, 4))
    groups = np.array([0, 1, 1, 2, 3, 3])
    p = pred.reshape(6, -1) / np.linalg.norm(pred.reshape(6, -1), axis=1, keepdims=True)
    t = true.reshape(6, -1) / np.linalg.norm(true.reshape(6, -1), axis=1, keepdims=True)
    logits = p @ t.T / 0.1

    def ce(lg: np.ndarray) -> float:
        same = (groups[:, None] == groups[None, :]).astype(float)
        q = same / same.sum(1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return float(-(q * logp).sum(1).mean())

    tp, tt, tg = torch.tensor(pred), torch.tensor(true), torch.tensor(groups)
    assert info_nce(tp, tt, 0.1, symmetric=False, groups=tg).item() == pytest.approx(ce(logits), rel=1e-5)
    assert info_nce(tp, tt, 0.1, groups=tg).item() == pytest.approx((ce(logits) + ce(logits.T)) / 2, rel=1e-5)
    eye = np.arange(6)
    plain = float(np.mean(np.log(np.exp(logits).sum(1)) - logits[eye, eye]))
    assert info_nce(tp, tt, 0.1, symmetric=False).item() == pytest.approx(plain, rel=1e-5)


def test_token_cosine_and_caption_mean():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 5, 3)), rng.normal(size=(4, 5, 3))
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert token_cosine(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(1 - cos.mean(), rel=1e-6)

    text = rng.normal(size=(3, 4, 2))
    text[0, 1:] = 0  # one caption
    text[2] = 0  # none
    mean, has = caption_mean(torch.tensor(text))
    assert has.tolist() == [True, True, False]
    np.testing.assert_allclose(mean[0], text[0, 0])
    np.testing.assert_allclose(mean[1], text[1].mean(0))


def litemind_block_numpy(block, x: np.ndarray) -> np.ndarray:
    """Lite-Mind's published block (dft_backbone.py ``Block``, eval mode), re-derived in numpy with
    loops: LN1 -> sum over filters m of cos((2m+1)pi/2M) W_m X X^2 in the rFFT over patches -> LN2
    -> MLP -> LN3 -> FreMLP (per-channel complex weights, ReLU, soft-shrink) -> residual."""
    from scipy.special import erf

    p = {k: v.detach().double().numpy() for k, v in block.named_parameters()}
    n = x.shape[1]

    def ln(h, name):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-6) * p[f"{name}.weight"] + p[f"{name}.bias"]

    spec = np.fft.rfft(ln(x, "norm1"), axis=1, norm="ortho")
    weights = p["filter.weight"][..., 0] + 1j * p["filter.weight"][..., 1]
    total = np.zeros_like(spec)
    for m in range(len(weights)):
        total = total + spec * weights[m] * np.cos((2 * m + 1) * np.pi / (2 * len(weights))) * spec**2
    y = np.fft.irfft(total, n=n, axis=1, norm="ortho")
    h = ln(y, "norm2") @ p["mlp.0.weight"].T + p["mlp.0.bias"]
    y = (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ p["mlp.3.weight"].T + p["mlp.3.bias"]
    spec = np.fft.rfft(ln(y, "norm3"), axis=1, norm="ortho")
    out = np.zeros_like(spec)
    for c in range(spec.shape[-1]):  # one channel at a time: the published einsum uses only diag(r), diag(i)
        wr, wi = p["projector.w_real"][c], p["projector.w_imag"][c]
        re = np.maximum(spec[..., c].real * wr - spec[..., c].imag * wi + p["projector.b_real"][c], 0)
        im = np.maximum(spec[..., c].imag * wr + spec[..., c].real * wi + p["projector.b_imag"][c], 0)
        out[..., c] = np.maximum(re - 0.01, 0) + 1j * np.maximum(im - 0.01, 0)  # soft-shrink of values >= 0
    return x + np.fft.irfft(out, n=n, axis=1, norm="ortho")


def test_litemind_block_matches_the_published_formula_rederived():
    torch.manual_seed(0)
    block = FrequencyBlock(n_patches=7, dim=5, mlp_ratio=2, dropout=0.3, sparsity=0.01, drop_path=0.5,
                           num_filters=3).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 7, 5)
    np.testing.assert_allclose(block(x).detach().numpy(), litemind_block_numpy(block, x.double().numpy()),
                               rtol=1e-4, atol=1e-4)
    block.train()  # DropPath: each sample's branch is kept (scaled 1/(1-p)) or dropped, never mixed
    torch.manual_seed(1)
    branch = torch.ones(64, 7, 5)
    out = drop_path(branch, 0.5, training=True)
    assert set(out.flatten(1).unique().tolist()) <= {0.0, 2.0} and (out.flatten(1).std(1) == 0).all()
    assert 10 < int((out[:, 0, 0] == 0).sum()) < 54


def test_litemind_paper_sizes_have_the_stated_parameter_count():
    from pipeline.fitting.adapters.litemind import LiteMind, LiteMindConfig

    model = LiteMind(LiteMindConfig(), 15724, {"layers/24_proj": (257, 768)}, {"input": np.arange(15724)})
    assert model.n_patches == 34 and model.n_params == 12_709_503
    with torch.no_grad():
        assert model(torch.zeros(2, 15724))["layers/24_proj"].shape == (2, 257, 768)



def test_litemind_predicts_and_contrasts_head_times_std_plus_mean():
    """The documented departure: the head output is standardised; predictions and the InfoNCE term
    use ``head * std + mean`` with the training targets' statistics, not the head output itself."""
    from pipeline.fitting.adapters.litemind import LiteMind, LiteMindConfig

    torch.manual_seed(0)
    cfg = LiteMindConfig(targets=("image_embeds",), patch_size=8, dims=(8,), depths=(1,), dropout=0.0,
                         drop_path=0.0, temperature=0.1)
    model = LiteMind(cfg, 40, {"image_embeds": (6,)}, {"input": np.arange(40)}).eval()
    scaler = model.scaler("image_embeds")
    scaler.mean.normal_(0, 3)
    scaler.std.uniform_(0.5, 4)
    x, raw_true = torch.randn(5, 40), torch.randn(5, 6)
    with torch.no_grad():
        head = model(x)["image_embeds"]
        mapped = head * scaler.std + scaler.mean
        torch.testing.assert_close(model.predict_batch(x)["image_embeds"], mapped)
        nce = model.loss(x, {"image_embeds": raw_true})["nce:image_embeds"]
    torch.testing.assert_close(nce, info_nce(raw_true, mapped, 0.1, symmetric=False))
    assert not torch.allclose(nce, info_nce(raw_true, head, 0.1, symmetric=False))

# ---- data -----------------------------------------------------------------------------------------
def test_dataset_reads_rows_by_image_id_from_zarr_or_numpy(caches):
    fmri, clip = caches
    targets = [DETAIL, SEMANTIC, TEXT]
    lazy = CacheDataset.from_stores(fmri, clip, targets)
    ids = fmri["train/image_ids"][...]
    eager = CacheDataset(fmri["train/betas"][...], ids, {t: clip[t][...] for t in targets}, targets)
    rows = [5, 0, 17, 5]
    for ds in (lazy, eager):
        batch = ds.__getitems__(rows)
        np.testing.assert_array_equal(batch["x"].numpy(), fmri["train/betas"][...][rows])
        np.testing.assert_array_equal(batch["image_id"].numpy(), ids[rows])
        for t in targets:
            np.testing.assert_array_equal(batch["targets"][t].numpy(), clip[t][...][ids[rows]].astype(np.float32))
    sub = lazy.subset(np.array([3, 4]))
    np.testing.assert_array_equal(sub[1]["x"].numpy(), fmri["train/betas"][4])


def test_target_statistics_match_numpy(caches):
    fmri, clip = caches
    data = CacheDataset.from_stores(fmri, clip, [DETAIL, TEXT])
    stats = target_statistics(data, [DETAIL, TEXT], batch_size=7)
    for name in (DETAIL, TEXT):
        rows = true_rows(clip, name, data.image_ids).astype(np.float64)
        np.testing.assert_allclose(stats[name][0].numpy(), rows.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats[name][1].numpy(), rows.std(0), rtol=1e-4, atol=1e-5)


def test_split_by_image_keeps_repeats_together():
    ids = np.repeat(np.arange(20), 3)[np.random.default_rng(0).permutation(60)]
    tr, va = split_by_image(ids, 0.25, seed=3)
    assert len(np.unique(ids[va])) == 5
    assert not set(ids[tr]) & set(ids[va])
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(60))
    np.testing.assert_array_equal(split_by_image(ids, 0.25, seed=3)[1], va)


def test_roi_assignment_follows_labels(caches):
    fmri, clip = caches
    labels = {k: fmri[f"voxels/{k}"][...] for k in fmri["voxels"].array_keys()}
    flat = {f"voxels/{k}": v for k, v in labels.items()} | {k: fmri[k][...] for k in ("train/betas", "train/image_ids")}
    data = CacheDataset.from_stores(flat, clip, adapter_targets("mclip", TINY_MCLIP))  # numpy, not zarr
    semantic = np.flatnonzero(np.any([labels[r] > 0 for r in FLOC], axis=0))
    low = build_adapter("mclip", {**TINY_MCLIP, "detail_rois": ["prf-visualrois"]}, data)
    np.testing.assert_array_equal(low.voxels_semantic.numpy(), semantic)
    np.testing.assert_array_equal(low.voxels_detail.numpy(), np.flatnonzero(labels["prf-visualrois"] > 0))
    np.testing.assert_array_equal(roi_indices(labels, None, data.n_voxels), np.arange(data.n_voxels))


# ---- learning, reloading --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mclip", "litemind"])
def test_beats_chance_on_test_retrieval(caches, trained, method):
    fmri, clip = caches
    model, result, targets = trained[method]
    test_ids = fmri["test/image_ids"][...]
    preds = predict(model, fmri["test/betas"][...])
    chance = 1 / len(test_ids)
    for name in (DETAIL, SEMANTIC):
        top1 = retrieval_top1(preds[name], true_rows(clip, name, test_ids), pool=len(test_ids), draws=1).brain_to_image
        assert top1 >= 7 * chance, (method, name, top1)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.n_params == sum(p.numel() for p in model.parameters())
    assert sum(model.parameter_counts().values()) == result.n_params
    if method == "mclip":
        assert preds[TEXT].shape == (len(test_ids), clip[TEXT].shape[2])
        assert result.history[-1]["train_text"] < result.history[0]["train_text"]
        assert {"train_self_rec", "train_cross_rec", "train_tokens"} <= set(result.history[0])


@pytest.mark.parametrize("method", ["mclip", "litemind"])
def test_saved_adapter_reloads_and_reproduces_predictions(caches, trained, method, tmp_path):
    fmri, _ = caches
    model, result, _ = trained[method]
    betas = fmri["test/betas"][...]
    save_adapter(tmp_path / method, model, extra={"train": result.as_dict()})
    spec = (tmp_path / method / "adapter.json").read_text()
    assert '"width": 64' in spec or '"dims": [' in spec  # the full config, not the code's defaults
    again = load_adapter(tmp_path / method)
    before, after = predict(model, betas), predict(again, betas)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_resume_after_interruption_matches_uninterrupted_run(caches, tmp_path, monkeypatch):
    fmri, clip = caches
    config = {**TINY_MCLIP, "text_target": None}
    data = CacheDataset.from_stores(fmri, clip, adapter_targets("mclip", config))
    settings = {**FAST, "epochs": 4, "batch_size": 32}

    straight = build_adapter("mclip", config, data, seed=1)
    full = train(straight, data, settings)

    import pipeline.fitting.train as train_module

    real = train_module.evaluate_loss
    calls = {"n": 0}

    def interrupt_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_loss", interrupt_in_epoch_3)
    ckpt = {**settings, "checkpoint_dir": str(tmp_path / "ckpt")}
    with pytest.raises(KeyboardInterrupt):
        train(build_adapter("mclip", config, data, seed=1), data, ckpt)
    monkeypatch.setattr(train_module, "evaluate_loss", real)
    resumed_model = build_adapter("mclip", config, data, seed=1)
    resumed = train(resumed_model, data, ckpt)

    assert resumed.resumed_from == 2
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]
    for (k, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(UserError, match="other settings"):
        train(build_adapter("mclip", config, data, seed=1), data, {**ckpt, "lr": 1e-3})


def test_early_stopping_restores_best_epoch(caches):
    fmri, clip = caches
    config = {**TINY_MCLIP, "text_target": None}
    targets = adapter_targets("mclip", config)
    data = CacheDataset.from_stores(fmri, clip, targets)
    # validation targets shuffled across images: fitting the training set makes them worse
    ids = fmri["test/image_ids"][...]
    shuffled = CacheDataset(fmri["test/betas"], np.roll(ids, 7), clip, targets)
    model = build_adapter("mclip", config, data)
    result = train(model, data, {**FAST, "epochs": 40, "patience": 3}, val=shuffled)
    assert result.stopped_early and result.epochs_run == result.best_epoch + 3 < 40
    losses = [h["val_loss"] for h in result.history]
    assert result.best_val_loss == min(losses) == losses[result.best_epoch - 1]


@pytest.mark.parametrize("method", ["mclip", "litemind"])
def test_losses_under_autocast_match_float32(caches, trained, method):
    """The mixed-precision path (bf16 autocast, exercised on CPU here) keeps losses in float32."""
    fmri, clip = caches
    model, _, targets = trained[method]
    batch = CacheDataset.from_stores(fmri, clip, targets).__getitems__(list(range(32)))
    args = (batch["x"], batch["targets"], batch["image_id"])
    with torch.no_grad():
        ref = model.loss(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.loss(*args)
    assert ref.keys() == low.keys()
    for k in ref:
        assert low[k].dtype == torch.float32
        assert float(low[k]) == pytest.approx(float(ref[k]), rel=0.02, abs=1e-3), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixed_precision_trains(caches):
    fmri, clip = caches
    data = CacheDataset.from_stores(fmri, clip, adapter_targets("litemind", TINY_LITEMIND))
    model = build_adapter("litemind", TINY_LITEMIND, data)
    result = train(model, data, {**FAST, "epochs": 3, "device": "cuda", "amp": True})
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    preds = predict(model, fmri["test/betas"][...])
    assert all(np.isfinite(v).all() for v in preds.values())


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_input_gives_clear_user_errors(caches, trained, tmp_path):
    fmri, clip = caches
    betas, ids = fmri["train/betas"][...], fmri["train/image_ids"][...]
    arrays = {t: clip[t][...] for t in (DETAIL, SEMANTIC)}

    nan = betas.copy()
    nan[4, [10, 20]] = np.nan
    with pytest.raises(UserError, match=r"NaN/inf in 2 voxels \(first: \[10, 20\]\)"):
        CacheDataset(nan, ids, arrays, [DETAIL])
    with pytest.raises(UserError, match=r"no target 'layers/11-20_mean' \(available: image_embeds, layers/2-4_mean"):
        CacheDataset.from_stores(fmri, clip, ["layers/11-20_mean"])
    far = ids.copy()
    far[0] = clip[DETAIL].shape[0]
    with pytest.raises(UserError, match=f"outside the CLIP cache's rows 0..{clip[DETAIL].shape[0] - 1}"):
        CacheDataset(betas, far, arrays, [DETAIL])

    model = trained["litemind"][0]
    with pytest.raises(UserError, match="NaN/inf"):
        predict(model, nan)
    with pytest.raises(UserError, match=f"expects \\(n, {betas.shape[1]}\\)"):
        predict(model, betas[:, :-1])

    data = CacheDataset(betas, ids, arrays, [DETAIL, SEMANTIC])
    with pytest.raises(UserError, match="unknown adapter method 'ridge2'"):
        build_adapter("ridge2", {}, data)
    with pytest.raises(UserError, match="unknown mclip parameter 'widht'"):
        build_adapter("mclip", {"widht": 3}, data)
    with pytest.raises(UserError, match="mclip needs target 'text_embeds'"):
        build_adapter("mclip", TINY_MCLIP, data)
    with pytest.raises(UserError, match="needs the fMRI cache's voxels"):
        build_adapter("mclip", {**TINY_MCLIP, "text_target": None}, data)  # no ROI labels given
    with_rois = CacheDataset(betas, ids, arrays, [DETAIL, SEMANTIC], fmri["voxels"])
    with pytest.raises(UserError, match="must hold \\(N, T, C\\) tokens"):
        build_adapter("mclip", {**TINY_MCLIP, "text_target": None, "detail_target": SEMANTIC}, with_rois)
    with pytest.raises(UserError, match="adapter.json not found"):
        load_adapter(tmp_path / "nothing")


def test_mclip_semantic_tokens_get_the_token_term_on_both_branches(caches):
    fmri, clip = caches
    config = {**TINY_MCLIP, "text_target": None, "semantic_target": "layers/6", "w_self": 0, "w_cross": 0}
    data = CacheDataset.from_stores(fmri, clip, adapter_targets("mclip", config))
    model = build_adapter("mclip", config, data, seed=0).eval()
    batch = data.__getitems__(list(range(16)))
    with torch.no_grad():
        terms = model.loss(batch["x"], batch["targets"], batch["image_id"])
        pred = model(batch["x"])
        z = {t: model.standardized_target(t, batch["targets"][t])[0] for t in (DETAIL, "layers/6")}
    assert pred["layers/6"].shape == (16, 17, 64)
    both = (token_cosine(pred[DETAIL], z[DETAIL]) + token_cosine(pred["layers/6"], z["layers/6"])) / 2
    assert float(terms["tokens"]) == pytest.approx(float(both), rel=1e-5)
    flat = info_nce(pred["layers/6"].flatten(1), z["layers/6"].flatten(1), 0.05, groups=batch["image_id"])
    assert float(terms["semantic"]) == pytest.approx(float(flat), rel=1e-5)
