"""A local diffusers folder with the architecture of ``stabilityai/stable-diffusion-2-1-unclip-small``
and random weights, for timing decode offline (never for images anyone should look at).

The component configs are derived, as diffusers' own converter derives them
(``diffusers.pipelines.stable_diffusion.convert_from_ckpt``: ``create_unet_diffusers_config``,
``create_vae_diffusers_config``, ``stable_unclip_image_noising_components``, its DDIM scheduler for
``parameterization: v``), from Stability's published inference config of the model,
``configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml`` in Stability-AI/stablediffusion,
whose numbers :data:`LDM_CONFIG` restates. The text encoder is SD 2's: OpenCLIP ViT-H/14's text
tower (open_clip's ``ViT-H-14`` config: width 1024, 16 heads, 24 layers, GELU, 77 tokens,
vocabulary 49408) without its last layer (``layer: penultimate``), as diffusers' SD 2 text
encoder is (23 layers); the tokenizer is a ``CLIPTokenizer`` over open_clip's own BPE vocabulary,
padding with token 0 (``!``), as open_clip pads. ``upcast_attention`` is on, as diffusers' SD 2.1
conversion recommends. Not built here (decode never loads them): the CLIP image encoder and
feature extractor.

    python benchmarks/unclip_small.py OUT [--tiny]

``--tiny`` writes the same pipeline class with test-sized components (32-d embeddings, for the
demo's tiny ViT), as tests/test_decode.py builds them.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch

LDM_CONFIG = {
    "model": {
        "params": {
            "parameterization": "v", "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000,
            "image_size": 96, "scale_factor": 0.18215,
            "noise_aug_config": {"params": {"timestep_dim": 768,
                                            "noise_schedule_config": {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}}},
            "unet_config": {"params": {
                "num_classes": "sequential", "adm_in_channels": 1536, "image_size": 32, "in_channels": 4,
                "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
                "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False,
            }},
            "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
            }}},
            "cond_stage_config": {"params": {"layer": "penultimate"}},
        }
    }
}
"""The numbers of v2-1-stable-unclip-l-inference.yaml that the diffusers components depend on."""
IMAGE_SIZE = 768
"""Output size: latent image_size 96 x the VAE's factor 8."""


def tokenizer(folder: Path):
    """A CLIPTokenizer whose vocab.json/merges.txt are open_clip's BPE vocabulary (what SD 2's
    tokenizer files hold), with its start/end tokens under their Hugging Face names."""
    import open_clip
    from open_clip.tokenizer import default_bpe
    from transformers import CLIPTokenizer

    tok = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tok.encoder.items()}
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="!")


def text_encoder():
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    text = open_clip.get_model_config("ViT-H-14")["text_cfg"]
    penultimate = LDM_CONFIG["model"]["params"]["cond_stage_config"]["params"]["layer"] == "penultimate"
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=text.get("vocab_size", 49408), hidden_size=text["width"], intermediate_size=4 * text["width"],
        num_attention_heads=text["heads"], num_hidden_layers=text["layers"] - int(penultimate),
        max_position_embeddings=text.get("context_length", 77), hidden_act="gelu", projection_dim=1024,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )).eval()


def build_small(folder: Path) -> Path:
    """The full-size pipeline, random weights, saved to ``folder`` (about 5 GB in float32)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
        create_unet_diffusers_config,
        create_vae_diffusers_config,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    params = LDM_CONFIG["model"]["params"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**create_unet_diffusers_config(LDM_CONFIG, image_size=IMAGE_SIZE), upcast_attention=True)
    vae = AutoencoderKL(**create_vae_diffusers_config(LDM_CONFIG, image_size=IMAGE_SIZE), scaling_factor=params["scale_factor"])
    noise = params["noise_aug_config"]["params"]
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=None, image_encoder=None,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=noise["timestep_dim"]).eval(),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=noise["noise_schedule_config"]["timesteps"],
                                              beta_schedule=noise["noise_schedule_config"]["beta_schedule"]),
        tokenizer=tokenizer(folder / "_tokenizer"), text_encoder=text_encoder(), unet=unet.eval(),
        scheduler=DDIMScheduler(beta_start=params["linear_start"], beta_end=params["linear_end"], beta_schedule="scaled_linear",
                                num_train_timesteps=params["timesteps"], steps_offset=1, clip_sample=False,
                                set_alpha_to_one=False, prediction_type="v_prediction"),
        vae=vae.eval(),
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny(folder: Path, dim: int = 32) -> Path:
    """Test-sized components of the same classes (tests/test_decode.py's), ``dim``-d image embeddings."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_decode  # noqa: E402  (the test suite's tiny component builders)

    assert dim == test_decode.D
    (folder / "_tower").mkdir(parents=True, exist_ok=True)
    test_decode.tiny_unclip(text_tower=test_decode.tiny_text_tower(folder / "_tower")).save_pretrained(folder)
    return folder


def build(folder: Path, tiny: bool = False) -> Path:
    """Build once: a folder that already holds a pipeline is reused."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        (build_tiny if tiny else build_small)(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    print(build(args.out, args.tiny))
