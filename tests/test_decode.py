"""Decoders and BrainCLIP tasks: retrieval against brute force, tiny offline Stable unCLIP, PNG output,
zero-shot category decoding on the demo's planted classes."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import open_clip
import pytest
import torch
import zarr
from PIL import Image

from _builders import D, tiny_text_tower, tiny_unclip
from pipeline.data.nsd import NSD
from pipeline.decoding import decode
from pipeline.demo.nsd import SHAPES, DemoConfig
from pipeline.errors import UserError
from pipeline.evaluation import zeroshot
from pipeline.features import clip

N = DemoConfig().n_images



# ---- file names, PNGs, grid -----------------------------------------------------------------------------
def test_recon_names_and_png_round_trip(tmp_path: Path):
    assert decode.recon_name(1234) == "01234.png"
    assert decode.recon_name(72999, 2) == "72999_2.png"
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 2, 8, 8, 3), dtype=np.uint8)
    paths = decode.write_reconstructions(tmp_path / "recon", [5, 70, 123], imgs)
    assert sorted(p.name for p in paths) == sorted(
        ["00005.png", "00005_1.png", "00070.png", "00070_1.png", "00123.png", "00123_1.png"]
    )
    np.testing.assert_array_equal(decode.read_reconstructions(tmp_path / "recon", [123, 5]), imgs[[2, 0], 0])
    np.testing.assert_array_equal(decode.read_reconstructions(tmp_path / "recon", [70], sample=1), imgs[[1], 1])
    with pytest.raises(UserError, match="reconstruction of image 6 not found: .*00006.png"):
        decode.read_reconstructions(tmp_path / "recon", [5, 6])
    with pytest.raises(UserError, match="3 reconstructions but 2 image ids"):
        decode.write_reconstructions(tmp_path / "x", [1, 2], imgs)


def test_grid_puts_ground_truth_above_reconstruction(tmp_path: Path):
    gt = np.zeros((3, 10, 10, 3), np.uint8)
    gt[..., 0] = 255  # red
    rec = np.zeros((3, 10, 10, 3), np.float32)
    rec[..., 2] = 1.0  # blue, float input
    path = decode.write_grid(tmp_path / "grid.png", gt, rec, per_row=2, tile=16)
    grid = np.asarray(Image.open(path))
    gap = 1
    assert grid.shape == (2 * (2 * 16 + 3 * gap) + gap, 2 * (16 + gap) + gap, 3)
    assert tuple(grid[gap + 8, gap + 8]) == (255, 0, 0)  # first pair, top: GT
    assert tuple(grid[gap + 16 + gap + 8, gap + 8]) == (0, 0, 255)  # below it: reconstruction
    assert tuple(grid[gap + 35 + 8, gap + 8]) == (255, 0, 0)  # third image starts the second row pair


# ---- retrieval ------------------------------------------------------------------------------------------
def test_nearest_rows_matches_brute_force(tmp_path: Path):
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(50, 3, 4)).astype(np.float32)
    bank[7] = bank[3] * 2.0  # same direction as row 3: equal cosine, the lower id wins
    queries = rng.normal(size=(6, 3, 4))
    queries[0] = bank[3]
    exclude = [10, 20, 30]
    z = zarr.create_array(tmp_path / "bank.zarr", shape=bank.shape, chunks=(8, 3, 4), dtype="float32")
    z[...] = bank
    ids, sims = decode.nearest_rows(queries, z, exclude=exclude, k=4, max_values=7 * 12)  # 8 blocks

    b = bank.reshape(50, -1).astype(np.float64)
    q = queries.reshape(6, -1)
    cos = (q @ b.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None]
    cos[:, exclude] = -np.inf
    expected = np.array([sorted(range(50), key=lambda j: (-round(cos[i, j], 5), j))[:4] for i in range(6)])
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(cos, expected, 1), atol=1e-5)
    assert ids[0, 0] == 3 and ids[0, 1] == 7

    with pytest.raises(UserError, match="12 values per image but the cached array has 8"):
        decode.nearest_rows(queries, bank[:, :2])
    with pytest.raises(UserError, match="excluded image ids must be in 0..49"):
        decode.nearest_rows(queries, bank, exclude=[50])
    with pytest.raises(UserError, match="cannot retrieve 48 images from 47 candidates"):
        decode.nearest_rows(queries, bank, exclude=exclude, k=48)


def test_take_rows_reads_h5py_in_any_order(tmp_path: Path):
    data = np.arange(10 * 2).reshape(10, 2)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = data
    with h5py.File(tmp_path / "x.h5", "r") as f:
        np.testing.assert_array_equal(decode.take_rows(f["x"], [7, 2, 7, 0]), data[[7, 2, 7, 0]])
        with pytest.raises(UserError, match=r"image ids must be in 0..9, got 2..10"):
            decode.take_rows(f["x"], [2, 10])


@pytest.fixture(scope="module")
def demo(demo_root: Path, demo_clip) -> dict:
    """The demo's images and image_embeds (conftest's CLIP cache), and the tiny ViT that made them."""
    nsd = NSD(demo_root)
    with nsd.stimuli() as stim:
        images = stim[...]
    embeds = zarr.open_group(demo_clip(), mode="r")["image_embeds"][...]
    loaded = clip.load_model("nsd-tiny-vit", str(demo_root / "demo/nsd-tiny-vit.safetensors"))
    test_ids = np.sort(nsd.expdesign.sharedix - 1)
    return {"loaded": loaded, "nsd": nsd, "images": images, "image_embeds": embeds, "test_ids": test_ids}


def test_retrieval_decode_on_the_demo(demo: dict):
    emb, images, test_ids = demo["image_embeds"], demo["images"], demo["test_ids"]
    pred = emb[test_ids] + np.random.default_rng(2).normal(scale=1e-3, size=(len(test_ids), emb.shape[1]))
    recon, ids = decode.retrieval_decode(pred, emb, images)  # the test images themselves are allowed
    np.testing.assert_array_equal(ids[:, 0], test_ids)
    np.testing.assert_array_equal(recon[:, 0], images[test_ids])

    recon, ids = decode.retrieval_decode(pred, emb, images, exclude=test_ids, k=2)
    assert recon.shape == (len(test_ids), 2, *images.shape[1:])
    assert not np.isin(ids, test_ids).any()
    np.testing.assert_array_equal(recon[3, 1], images[ids[3, 1]])
    with pytest.raises(UserError, match=f"the cache has {N} rows but the stimulus file {N - 1}"):
        decode.retrieval_decode(pred, emb, images[:-1])


# ---- zero-shot and text targets --------------------------------------------------------------------------
def test_coco_categories_are_the_planted_classes(demo: dict):
    ids = np.array([0, 9, 13, 200, N - 1])
    names, labels = demo["nsd"].categories(ids)
    assert names == list(SHAPES)
    expected = np.zeros((5, len(SHAPES)), bool)
    expected[np.arange(5), ids % len(SHAPES)] = True  # the demo draws shape i % 8 for image i
    np.testing.assert_array_equal(labels, expected)
    with pytest.raises(UserError, match=rf"image ids \[{N}\] are not in .*nsd_stim_info_merged.csv"):
        demo["nsd"].categories([3, N])


def test_class_embeddings_use_the_clip_text_tower(demo: dict):
    loaded = demo["loaded"]
    emb = zeroshot.class_embeddings(loaded, ["circle", "ring"], templates=("a photo of a {}.", "a {} shape"))
    tok = open_clip.get_tokenizer("nsd-tiny-vit")
    with torch.no_grad():
        raw = loaded.model.encode_text(tok(["a photo of a ring.", "a ring shape"])).numpy().astype(np.float64)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    ring = raw.mean(0) / np.linalg.norm(raw.mean(0))
    np.testing.assert_allclose(emb[1], ring, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_zero_shot_accuracy_matches_brute_force():
    rng = np.random.default_rng(3)
    classes = rng.normal(size=(6, 4))
    labels = np.zeros((20, 6), bool)
    labels[np.arange(20), rng.integers(0, 6, 20)] = True
    labels[:5, 0] = True  # multi-label: any of an image's categories counts
    labels[19] = False  # an image without categories is left out
    pred = rng.normal(size=(20, 4))
    got = zeroshot.zero_shot_accuracy(pred, classes, labels, topk=(1, 3))
    cos = pred @ classes.T / np.linalg.norm(pred, axis=1)[:, None] / np.linalg.norm(classes, axis=1)[None]
    ranked = [np.argsort(-c)[:3] for c in cos[:19]]
    assert got["top1"] == pytest.approx(np.mean([labels[i, r[0]] for i, r in enumerate(ranked)]))
    assert got["top3"] == pytest.approx(np.mean([labels[i, r].any() for i, r in enumerate(ranked)]))
    assert (got["n_scored"], got["n_unlabelled"]) == (19, 1)
    perfect = zeroshot.zero_shot_accuracy(classes[labels[:19].argmax(1)], classes, labels[:19], topk=(1,))
    assert perfect["top1"] == 1.0
    with pytest.raises(UserError, match="between 1 and the 6 categories, not \\[7\\]"):
        zeroshot.zero_shot_accuracy(pred, classes, labels, topk=(1, 7))
    with pytest.raises(UserError, match="labels must be"):
        zeroshot.zero_shot_accuracy(pred, classes, labels[:5])


def test_caption_targets_average_present_captions():
    emb = np.zeros((2, 3, 2))
    emb[0, 0], emb[0, 1] = [3.0, 0.0], [0.0, 0.5]  # third caption absent (zeros)
    emb[1, :] = [1.0, 1.0]
    np.testing.assert_allclose(zeroshot.caption_targets(emb), [[0.5, 0.5], [2**-0.5, 2**-0.5]])
    emb[1] = 0
    with pytest.raises(UserError, match="1 images have no caption embedding"):
        zeroshot.caption_targets(emb)


# ---- Stable unCLIP with tiny offline components ----------------------------------------------------------
@pytest.fixture(scope="module")
def unclip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unclip") / "tiny-unclip"
    tiny_unclip().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def unclip_inputs() -> dict:
    rng = np.random.default_rng(4)
    return {
        "embeds": rng.normal(size=(3, D)).astype(np.float32),
        "ids": [11, 42, 7],
        "prompt": torch.from_numpy(rng.normal(size=(1, 5, D)).astype(np.float32)),
        "init": rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8),
    }


def test_denoise_reproduces_the_diffusers_pipeline(unclip_inputs: dict):
    pipe = tiny_unclip(with_image_encoder=True)
    emb = torch.from_numpy(unclip_inputs["embeds"][:2])
    pe = unclip_inputs["prompt"].expand(2, -1, -1)
    neg = torch.zeros_like(pe)
    gens = lambda: [decode.sample_generator(0, i, 0) for i in (3, 5)]  # noqa: E731
    ref = pipe(image_embeds=emb, prompt_embeds=pe, negative_prompt_embeds=neg, num_inference_steps=2,
               guidance_scale=3.0, noise_level=25, generator=gens(), output_type="np").images
    ours = decode.denoise(pipe, emb, pe, neg, gens(), steps=2, guidance=3.0, noise_level=25)
    np.testing.assert_array_equal(ours, ref)


def test_unclip_decode_is_deterministic_and_detail_switch_acts(unclip_dir: Path, unclip_inputs: dict):
    pipe = decode.load_unclip(unclip_dir, local_files_only=True)
    assert decode.embed_dim(pipe) == D and pipe.tokenizer is None and pipe.image_encoder is None
    kw = dict(steps=2, prompt_embeds=unclip_inputs["prompt"], noise_level=10)
    emb, ids = unclip_inputs["embeds"], unclip_inputs["ids"]
    first = decode.unclip_decode(pipe, emb, ids, samples=2, batch_size=4, **kw)
    assert first.shape == (3, 2, 32, 32, 3) and first.dtype == np.uint8
    # same seeds per (id, sample) whatever the batching and the other images in the batch
    again = decode.unclip_decode(pipe, emb, ids, samples=2, batch_size=3, **kw)
    assert np.abs(first.astype(int) - again).max() <= 1
    assert np.abs(first[:, 0].astype(int) - first[:, 1]).mean() > 1  # samples differ
    other_seed = decode.unclip_decode(pipe, emb[:1], ids[:1], seed=1, **kw)
    assert np.abs(first[0, 0].astype(int) - other_seed[0, 0]).mean() > 1

    # the detail branch: starting from init images changes the output, and which init matters
    init = unclip_inputs["init"]
    with_init = decode.unclip_decode(pipe, emb, ids, init_images=init, strength=0.5, **kw)
    swapped = decode.unclip_decode(pipe, emb, ids, init_images=init[::-1], strength=0.5, **kw)
    assert np.abs(with_init[:, 0].astype(int) - first[:, 0]).mean() > 1
    assert np.abs(with_init[0].astype(int) - swapped[0]).mean() > 1
    assert np.abs(with_init[1].astype(int) - swapped[1]).max() <= 1  # same init for the middle image


def test_unclip_progress_shows_on_a_terminal_only(unclip_dir: Path, unclip_inputs: dict, capsys, monkeypatch):
    pipe = decode.load_unclip(unclip_dir, local_files_only=True)
    emb, ids = unclip_inputs["embeds"], unclip_inputs["ids"]
    kw = dict(steps=3, prompt_embeds=unclip_inputs["prompt"], noise_level=10, batch_size=2)
    monkeypatch.delenv("CI", raising=False)
    quiet = decode.unclip_decode(pipe, emb, ids, **kw)  # captured stderr is no terminal
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = decode.unclip_decode(pipe, emb, ids, **kw)
    err = capsys.readouterr().err
    assert "unclip" in err and "3/3" in err  # the bar over reconstructions ends at all 3 images
    assert "denoising steps" in err  # each batch's step bar (diffusers' own), erased when the batch ends
    np.testing.assert_array_equal(quiet, shown)
    assert pipe._progress_bar_config == {"disable": True}  # the pipeline's own setting is back
    monkeypatch.setenv("CI", "true")
    decode.unclip_decode(pipe, emb[:1], ids[:1], **kw)
    assert capsys.readouterr().err == ""


def test_unclip_init_images_are_preprocessed_per_batch(unclip_dir: Path, unclip_inputs: dict, monkeypatch):
    """The detail branch's init images are preprocessed with their decode batch (never all n at once),
    and each batch gets the same tensor rows as preprocessing all of them together."""
    pipe = decode.load_unclip(unclip_dir, local_files_only=True)
    init = unclip_inputs["init"]
    whole = decode._init_tensor(pipe, init, None, None)
    sizes, starts = [], []
    preprocess, denoise = pipe.image_processor.preprocess, decode.denoise
    monkeypatch.setattr(pipe.image_processor, "preprocess",
                        lambda images, **kw: sizes.append(len(images)) or preprocess(images, **kw))
    monkeypatch.setattr(decode, "denoise", lambda *a, init_images, **kw: starts.append(init_images) or denoise(
        *a, init_images=init_images, **kw))
    decode.unclip_decode(pipe, unclip_inputs["embeds"], unclip_inputs["ids"], samples=2, batch_size=4, steps=2,
                         prompt_embeds=unclip_inputs["prompt"], init_images=init, strength=0.5)
    assert sizes == [4, 2]  # 3 images x 2 samples in batches of 4
    torch.testing.assert_close(torch.cat(starts), whole.repeat_interleave(2, 0), rtol=0, atol=0)


def test_empty_prompt_goes_through_the_text_encoder(unclip_inputs: dict, tmp_path: Path):
    tokenizer, text_encoder = tiny_text_tower(tmp_path)
    pipe = tiny_unclip(text_tower=(tokenizer, text_encoder))
    pos, neg = decode.prompt_embeddings(pipe, "")
    ids = tokenizer("", padding="max_length", max_length=6, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_encoder(ids)[0]
    torch.testing.assert_close(pos, expected)
    torch.testing.assert_close(neg, expected)  # the unconditional branch is the empty prompt too
    emb, image_ids = unclip_inputs["embeds"][:1], unclip_inputs["ids"][:1]
    np.testing.assert_array_equal(
        decode.unclip_decode(pipe, emb, image_ids, steps=1),
        decode.unclip_decode(pipe, emb, image_ids, steps=1, prompt_embeds=expected),
    )


def test_unclip_errors(unclip_dir: Path, unclip_inputs: dict, tmp_path: Path):
    pipe = decode.load_unclip(unclip_dir, local_files_only=True)
    emb, ids, pe = unclip_inputs["embeds"], unclip_inputs["ids"], unclip_inputs["prompt"]
    with pytest.raises(UserError, match="are 16-d but this unCLIP model takes 32-d"):
        decode.unclip_decode(pipe, emb[:, :16], ids, prompt_embeds=pe, steps=1)
    with pytest.raises(UserError, match=r"expected \(2, D\) image_embeds for 2 image ids"):
        decode.unclip_decode(pipe, emb, ids[:2], prompt_embeds=pe, steps=1)
    with pytest.raises(UserError, match="no tokenizer/text encoder: pass prompt_embeds"):
        decode.unclip_decode(pipe, emb, ids, steps=1)
    with pytest.raises(UserError, match="2 init images for 3 image ids"):
        decode.unclip_decode(pipe, emb, ids, prompt_embeds=pe, init_images=unclip_inputs["init"][:2])
    with pytest.raises(UserError, match="strength must be in"):
        decode.unclip_decode(pipe, emb, ids, prompt_embeds=pe, init_images=unclip_inputs["init"], strength=0.1, steps=2)
    with pytest.raises(UserError, match="noise_level must be in 0..999"):
        decode.unclip_decode(pipe, emb, ids, prompt_embeds=pe, noise_level=1000)


def test_load_unclip_missing_weights(tmp_path: Path):
    with pytest.raises(UserError, match="local folder not found"):
        decode.load_unclip(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        decode.load_unclip(tmp_path / "empty")
    with pytest.raises(UserError, match="stable-diffusion-2-1-unclip-small.*not in .*hub-cache"):
        decode.load_unclip("stabilityai/stable-diffusion-2-1-unclip-small", local_files_only=True,
                           cache_dir=tmp_path / "hub-cache")
