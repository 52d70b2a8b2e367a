"""Builders that several test modules need: small stage outputs (each in the folder it is given) and
tiny offline models."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from pipeline.decoding.run import decode_run
from pipeline.features import clip as clip_lib
from pipeline.fitting.fit import fit_adapters

D = 32  # tiny CLIP embedding size (the demo's nsd-tiny-vit has embed_dim 32 too)


# ---- references and stage outputs ---------------------------------------------------------------------
def images_of(root: Path, rows) -> np.ndarray:
    """Rows of an NSD root's stimulus file, read straight with h5py."""
    with h5py.File(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "r") as f:
        return f["imgBrick"][()][rows]


def hooked_forward(weights: Path, images: np.ndarray):
    """Block outputs from forward hooks and encode_image, on the model's own open_clip transform."""
    loaded = clip_lib.load_model("nsd-tiny-vit", str(weights))
    pixels = torch.stack([loaded.preprocess(Image.fromarray(im)) for im in images])
    blocks = {}
    hooks = [
        blk.register_forward_hook(lambda mod, args, out, k=k: blocks.__setitem__(k, out.detach()))
        for k, blk in enumerate(loaded.model.visual.transformer.resblocks, start=1)
    ]
    with torch.no_grad():
        embeds = loaded.model.encode_image(pixels)
    for h in hooks:
        h.remove()
    return loaded, {k: v.numpy() for k, v in blocks.items()}, embeds.numpy()


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes): two stores compare byte for byte."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def decoded_ridge_run(fmri: Path, clip: Path, demo_root: Path, out: Path, targets: list[str]) -> Path:
    """``out``: a ridge run of the caches ``fmri`` and ``clip`` on ``targets``, decoded (retrieval)."""
    fit_adapters(fmri, clip, "ridge", out, targets=targets, params={"alphas": [10.0, 1000.0], "cv": 2},
                 progress=False)
    decode_run(out, demo_root)
    return out


# ---- tiny offline models -------------------------------------------------------------------------------
def tiny_text_tower(folder: Path):
    """A real CLIPTokenizer over a 4-token vocabulary written here, and a tiny random CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    (folder / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "a</w>": 3}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=6)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=4, hidden_size=D, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=6, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=D,
    )).eval()
    return tokenizer, text_encoder


def tiny_unclip(with_image_encoder: bool = False, text_tower: tuple | None = None):
    """diffusers-style dummy components: tiny UNet and VAE, DDIM + DDPM, no tokenizer/text encoder
    unless ``text_tower`` is given."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16), attention_head_dim=(2, 4), cross_attention_dim=D,
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * D,
        upcast_attention=True, use_linear_projection=True,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=8,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=32,
    )
    torch.manual_seed(0)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=D)
    normalizer.mean.data.normal_()
    normalizer.std.data.uniform_(0.5, 2.0)
    encoder = None
    if with_image_encoder:  # only pipe.__call__ needs it (for its parameters' dtype)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=D, projection_dim=D, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            intermediate_size=37, patch_size=8,
        )).eval()
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=None, image_encoder=encoder, image_normalizer=normalizer.eval(),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=text_tower[0] if text_tower else None, text_encoder=text_tower[1] if text_tower else None,
        unet=unet.eval(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        vae=vae.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
