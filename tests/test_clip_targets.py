"""The real-weights path and the published targets: QuickGELU resolution from a Hugging Face cache
(ViT-B-32 with random weights under the repo id / file name open_clip's ``openai`` config asks for),
projected tokens (``K:proj``) and merged tokens (``merge:K``) against forward hooks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import zarr
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from _builders import hooked_forward, images_of
from cli import app
from pipeline.data.nsd import NSD
from pipeline.demo.nsd import DemoConfig
from pipeline.errors import UserError
from pipeline.features import clip
from pipeline.features.extract import extract_clip
from pipeline.fitting.pairs import available_targets

KW = dict(model="nsd-tiny-vit", shard_rows=64, batch_size=32, images="0-63", captions=False, progress=False)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache_with(root: Path, repo: str, file: str, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face hub cache holding ``repo``'s ``file`` at revision main (as a download leaves it)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs/main").write_text(COMMIT)
    (folder / "snapshots" / COMMIT).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / COMMIT / file))
    return root


REPOS = {"ViT-B-32": "timm/vit_base_patch32_clip_224.openai", "ViT-L-14": "timm/vit_large_patch14_clip_224.openai"}


def openai_cache(root: Path, name: str) -> Path:
    """Random weights of the real ``name`` (QuickGELU, as OpenAI trained it), in fp16, where open_clip
    looks for ``name``/``openai``."""
    torch.manual_seed(0)
    state = open_clip.create_model(f"{name}-quickgelu", pretrained=None).state_dict()
    repo, files = clip.hf_weights(name, "openai")
    assert repo == REPOS[name] and files[0] == "open_clip_model.safetensors"
    return hf_cache_with(root, repo, files[0], {k: v.half() for k, v in state.items()})


def reference(arch: str, weights: Path, images: np.ndarray):
    """Block outputs (forward hooks), encode_image and the model, for ``arch`` with these weights."""
    net, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    net.load_state_dict(load_file(str(weights)))
    net.eval()
    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    blocks = {}
    hooks = [blk.register_forward_hook(lambda m, a, out, k=k: blocks.__setitem__(k, out.detach()))
             for k, blk in enumerate(net.visual.transformer.resblocks, start=1)]
    with torch.no_grad():
        embeds = net.encode_image(pixels)
    for h in hooks:
        h.remove()
    return net, blocks, embeds


def project(net, tokens: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (net.visual.ln_post(tokens) @ net.visual.proj).numpy()


@pytest.mark.parametrize("name,blocks", [("ViT-B-32", 12), pytest.param("ViT-L-14", 24, marks=pytest.mark.slow)])
def test_openai_tag_from_an_offline_hf_cache_builds_quickgelu(demo_root, tmp_path, monkeypatch, name, blocks):
    cache = openai_cache(tmp_path / "hf", name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    out, mid, last = tmp_path / "real.zarr", blocks // 2, blocks
    result = CliRunner().invoke(app, [
        "extract-clip", "--stimuli", str(demo_root), "--out", str(out), "--model", name, "--pretrained", "openai",
        "--layers", f"{mid},{last},{last}:proj", "--images", "0-1", "--shard-rows", "2", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    store = zarr.open_group(out, mode="r")
    weights = next(cache.rglob("open_clip_model.safetensors"))
    net, hooked, embeds = reference(f"{name}-quickgelu", weights, images_of(demo_root, [0, 1]))
    for k in (mid, last):
        np.testing.assert_allclose(store[f"layers/{k}"][0:2], hooked[k].numpy().astype(np.float16), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(store[f"layers/{last}_proj"][0:2], project(net, hooked[last]), rtol=1e-2, atol=2e-2)
    np.testing.assert_allclose(store["image_embeds"][0:2], embeds.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(store[f"layers/{last}_proj"][0:2, 0], embeds.numpy(), rtol=1e-2, atol=2e-2)
    captions = NSD(demo_root).captions(np.array([0, 1]), 5)
    with torch.no_grad():
        text = net.encode_text(open_clip.get_tokenizer(name)([str(c) for c in captions[0]])).numpy()
    np.testing.assert_allclose(store["text_embeds"][0], text, rtol=1e-4, atol=1e-4)
    # the GELU tower open_clip builds for plain "ViT-B-32" gives other numbers with the same weights
    _, _, gelu_embeds = reference(name, weights, images_of(demo_root, [0, 1]))
    assert not np.allclose(gelu_embeds.numpy(), embeds.numpy(), atol=1e-3)
    settings = store.attrs["settings"]
    assert settings["activation"] == "quick_gelu" and settings["open_clip_model"] == f"{name}-quickgelu"
    assert settings["model_config"]["quick_gelu"] is True and store.attrs["projection"].startswith("token 0")


def test_activation_resolution_for_every_tag():
    for name in ("ViT-B-32", "ViT-L-14", "ViT-bigG-14", "ViT-B-16"):
        for tag in open_clip.list_pretrained_tags_by_model(name):
            arch = clip.resolve_architecture(name, tag)
            assert arch.quick_gelu == bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))
            assert arch.config.get("quick_gelu", False) == arch.quick_gelu
    assert clip.resolve_architecture("ViT-L-14", "openai").name == "ViT-L-14-quickgelu"
    assert clip.resolve_architecture("ViT-L-14", "laion2b_s32b_b82k").name == "ViT-L-14"
    assert clip.resolve_architecture("ViT-L-14-quickgelu", "openai") == clip.resolve_architecture("ViT-L-14", "openai")
    with pytest.raises(UserError, match="trained with QuickGELU"):
        clip.resolve_architecture("ViT-L-14", "openai", "gelu")
    with pytest.raises(UserError, match="trained with GELU"):
        clip.resolve_architecture("ViT-L-14", "laion2b_s32b_b82k", "quick_gelu")


def test_weights_that_do_not_fit_or_are_missing_fail_in_one_line(demo_root, tmp_path, monkeypatch):
    tiny = load_file(str(demo_root / "demo/nsd-tiny-vit.safetensors"))
    repo, files = clip.hf_weights("ViT-B-32", "openai")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache_with(tmp_path / "hf", repo, files[0], tiny)))
    with pytest.raises(UserError, match=r"cached weights do not fit ViT-B-32-quickgelu: "):
        clip.load_model("ViT-B-32", "openai")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"not found in the Hugging Face cache .*timm/vit_base_patch32_clip_224.openai"):
        clip.load_model("ViT-B-32", "openai")


def test_a_store_of_the_other_activation_is_refused(demo_root, tmp_path):
    weights = str(demo_root / "demo/nsd-tiny-vit.safetensors")
    out = extract_clip(demo_root, tmp_path / "x.zarr", pretrained=weights, layers="6", **KW)
    assert zarr.open_group(out, mode="r").attrs["settings"]["activation"] == "gelu"
    with pytest.raises(UserError, match=r"other settings \(activation: 'gelu' there, 'quick_gelu' now"):
        extract_clip(demo_root, out, pretrained=weights, layers="6", activation="quick_gelu", **KW)
    forced = clip.load_model("nsd-tiny-vit", weights, activation="quick_gelu")
    assert forced.architecture.force_quick_gelu and clip._built_activation(forced.model) == "quick_gelu"


@pytest.fixture(scope="module")
def targets_store(demo_root, tmp_path_factory) -> Path:
    weights = str(demo_root / "demo/nsd-tiny-vit.safetensors")
    return extract_clip(demo_root, tmp_path_factory.mktemp("t") / "m.zarr", pretrained=weights,
                        layers="2,6:proj,2-4:mean", tokens="merge:5", **KW)


def test_projected_tokens_match_hooks_and_token0_is_image_embeds(demo_root, tmp_path):
    weights = demo_root / "demo/nsd-tiny-vit.safetensors"
    out = extract_clip(demo_root, tmp_path / "p.zarr", pretrained=str(weights), layers="6:proj,3:proj", tokens="all", **KW)
    g = zarr.open_group(out, mode="r")
    loaded, blocks, embeds = hooked_forward(weights, images_of(demo_root, range(64)))
    assert g["layers/6_proj"].shape == (DemoConfig().n_images, 17, 32)  # D = embed_dim 32, not the width 64
    for k in (3, 6):
        np.testing.assert_allclose(g[f"layers/{k}_proj"][0:64], project(loaded.model, torch.from_numpy(blocks[k])),
                                   rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(g["layers/6_proj"][0:64, 0], embeds, rtol=2e-3, atol=2e-3)
    cls = extract_clip(demo_root, tmp_path / "c.zarr", pretrained=str(weights), layers="6:proj", tokens="cls", **KW)
    np.testing.assert_array_equal(zarr.open_group(cls, mode="r")["layers/6_proj"][0:64], g["layers/6_proj"][0:64, :1])


def test_merged_tokens_keep_sizes_and_sums_of_the_hooked_tokens(demo_root, targets_store):
    g = zarr.open_group(targets_store, mode="r")
    loaded, blocks, _ = hooked_forward(demo_root / "demo/nsd-tiny-vit.safetensors", images_of(demo_root, range(64)))
    originals = {"2": blocks[2], "6_proj": project(loaded.model, torch.from_numpy(blocks[6])),
                 "2-4_mean": np.mean([blocks[k] for k in (2, 3, 4)], axis=0)}
    for name, full in originals.items():
        tokens, sizes = g[f"layers/{name}"][0:64].astype(np.float32), g[f"layers/{name}__sizes"][0:64]
        assert tokens.shape == (64, 6, full.shape[-1]) and sizes.dtype == np.int16
        assert (sizes.sum(1) == 17).all() and (sizes[:, 0] == 1).all() and (sizes > 0).all()
        np.testing.assert_allclose(tokens[:, 0], full[:, 0], rtol=2e-3, atol=2e-3)  # CLS untouched
        np.testing.assert_allclose((sizes[..., None] * tokens).sum(1), full.sum(1), rtol=1e-2, atol=2e-2)
    assert not any(t.endswith("__sizes") for t in available_targets(g))
    assert "layers/2" in available_targets(g) and "merge:5" in g.attrs["token_layout"] + g.attrs["tokens"]


def test_bipartite_merging_joins_similar_neighbours():
    from pipeline.features.merge import merge_assignment, merge_tokens

    x = torch.zeros(2, 16, 3)
    x[:, :8, 0], x[:, 8:, 1] = 1.0, 1.0  # top half and bottom half of a 4x4 grid
    x += 0.01 * torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(merge_assignment(x, (4, 4), 2), np.repeat([[0, 1]], 8, axis=1).repeat(2, 0))
    tokens, sizes = merge_tokens(torch.ones(2, 1, 3), x, (4, 4), 2)
    np.testing.assert_array_equal(sizes, [[1, 8, 8]] * 2)
    np.testing.assert_allclose(tokens[:, 1], x[:, :8].mean(1), rtol=1e-6)


def test_projection_and_merge_bad_input(demo_root, tmp_path, monkeypatch):
    config = json.loads((Path(clip.MODEL_CONFIG_DIR) / "nsd-tiny-vit.json").read_text())
    config["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    (tmp_path / "pooled-vit.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    base = ["extract-clip", "--stimuli", str(demo_root), "--out", str(tmp_path / "x.zarr"), "--shard-rows", "64"]
    cases = [
        (["--model", str(tmp_path / "pooled-vit.json"), "--pretrained", "none", "--layers", "2:proj"], "pools tokens with attention"),
        (["--model", "ViT-B-32", "--pretrained", "openai", "--activation", "gelu"], "trained with QuickGELU"),
        (["--model", "ViT-B-32", "--pretrained", "openai2"], "has no pretrained tag 'openai2'"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, base + args)
        assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output
        assert not (tmp_path / "x.zarr").exists()
