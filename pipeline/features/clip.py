"""CLIP model loading and per-layer token extraction (open_clip).

Layers are named 1-based, as in shared/DESIGN.md: block k's output, 24 = last block of ViT-L/14
(before ``ln_post``). open_clip's ``forward_intermediates`` is 0-based and returns the CLS token
separately; :func:`encode_layers` converts both and returns CLS first, then the patch tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError

MODEL_CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
"""Configs shipped with the project (the demo's tiny ViT), usable by name like open_clip's own."""


# ---- layer and token specs ------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """One cached array: a single block (``16``) or an aggregate over a range (``11-20:mean``)."""

    blocks: tuple[int, ...]  # 1-based
    aggregate: str | None = None

    @property
    def name(self) -> str:
        if self.aggregate is None:
            return str(self.blocks[0])
        return f"{self.blocks[0]}-{self.blocks[-1]}_{self.aggregate}"


_LAYER_RE = re.compile(r"^(\d+)(?:-(\d+):(mean))?$")


def parse_layers(spec: str, n_blocks: int) -> list[LayerSpec]:
    """Parse ``"8,16,24,11-20:mean"`` and check every block against the model's 1..n_blocks."""
    layers: list[LayerSpec] = []
    for item in (s.strip() for s in spec.split(",")):
        m = _LAYER_RE.match(item)
        if not m:
            raise UserError(
                f"--layers: cannot parse {item!r}; use block numbers (8,16,24) or ranges with an "
                "aggregate (11-20:mean)"
            )
        lo, hi, agg = int(m[1]), int(m[2] or m[1]), m[3]
        if not (1 <= lo <= hi <= n_blocks):
            raise UserError(
                f"--layers: {item!r} is out of range; this model has blocks 1..{n_blocks} (1-based)"
            )
        layers.append(LayerSpec(tuple(range(lo, hi + 1)), agg))
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise UserError(f"--layers: duplicate layers in {spec!r}")
    return layers


@dataclass(frozen=True)
class TokenMode:
    """How the (1 + P) tokens of a block are reduced: ``all``, ``cls``, ``mean`` or ``grid:K``."""

    kind: str
    grid: int = 0

    @classmethod
    def parse(cls, spec: str) -> TokenMode:
        if spec in ("all", "cls", "mean"):
            return cls(spec)
        m = re.fullmatch(r"grid:(\d+)", spec)
        if m and int(m[1]) >= 1:
            return cls("grid", int(m[1]))
        raise UserError(f"--tokens must be all, cls, mean or grid:K (K >= 1), not {spec!r}")

    def __str__(self) -> str:
        return f"grid:{self.grid}" if self.kind == "grid" else self.kind

    def check(self, grid_hw: tuple[int, int]) -> None:
        """Fail early (before any output is written) when ``grid:K`` is finer than the patch grid."""
        if self.kind == "grid" and self.grid > min(grid_hw):
            raise UserError(f"--tokens grid:{self.grid} is finer than the model's {grid_hw} patch grid")

    def n_tokens(self, n_patches: int) -> int:
        return {"all": 1 + n_patches, "cls": 1, "mean": 1, "grid": 1 + self.grid**2}[self.kind]

    def reduce(self, cls_tok: torch.Tensor, patches: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(B, 1, C) CLS and (B, P, C) patches -> (B, T, C) tokens of this mode."""
        if self.kind == "all":
            return torch.cat([cls_tok, patches], dim=1)
        if self.kind == "cls":
            return cls_tok
        if self.kind == "mean":
            return patches.mean(dim=1, keepdim=True)
        self.check(grid_hw)
        b, p, c = patches.shape
        grid = patches.transpose(1, 2).reshape(b, c, *grid_hw)
        pooled = F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)
        return torch.cat([cls_tok, pooled], dim=1)


# ---- model loading --------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """An open_clip model with the facts the cache records about it."""

    model: open_clip.CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]
    name: str
    pretrained: str  # tag, file path or "none"
    weights_sha256: str | None
    config: dict

    @property
    def n_blocks(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def grid_hw(self) -> tuple[int, int]:
        return tuple(self.model.visual.grid_size)

    @property
    def n_patches(self) -> int:
        h, w = self.grid_hw
        return h * w

    @property
    def width(self) -> int:
        return int(self.model.visual.transformer.width)

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    def preprocess_description(self) -> dict:
        """The resize/crop/normalisation the model's own transform applies (for provenance)."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model.visual.preprocess_cfg.items()}
        return {**cfg, "transform": " ".join(repr(self.preprocess).split())}


def resolve_model_name(model: str) -> str:
    """An open_clip architecture name, a project config name, or a path to a config JSON."""
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"--model: config file not found: {path}")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"--model: {path} is not valid JSON ({exc})") from None
        open_clip.add_model_config(path)
        return path.stem
    shipped = MODEL_CONFIG_DIR / f"{model}.json"
    if shipped.is_file():
        open_clip.add_model_config(shipped)
    if model not in open_clip.list_models():
        raise UserError(
            f"--model: unknown architecture {model!r}; use an open_clip name (e.g. ViT-L-14) or a "
            "path to a model-config JSON"
        )
    return model


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file: safetensors, or a torch.save'd state_dict (optionally under 'state_dict')."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--pretrained: cannot read checkpoint {path} ({exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"--pretrained: {path} does not hold a state_dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class _NoRandomInitWarning(logging.Filter):
    """Hide open_clip's "initialized randomly" warning when a checkpoint file is loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


def load_model(model: str, pretrained: str | None = "openai", device: str = "cpu") -> LoadedModel:
    """Build an open_clip model by name or config and load weights from a tag, a file or none.

    ``pretrained`` may be an open_clip tag (``openai``, ``laion2b_s32b_b82k``...), a local
    checkpoint file, or ``none``/``None`` for random initialisation (tests and timing only).
    """
    name = resolve_model_name(model)
    pre = None if pretrained in (None, "", "none") else str(pretrained)
    ckpt = Path(pre) if pre is not None and Path(pre).is_file() else None
    if pre is not None and ckpt is None and (Path(pre).suffix or "/" in pre):
        raise UserError(f"--pretrained: checkpoint file not found: {pre}")
    tag = None if ckpt is not None else pre
    if tag is not None and tag not in open_clip.list_pretrained_tags_by_model(name):
        known = open_clip.list_pretrained_tags_by_model(name) or ["none"]
        raise UserError(f"--pretrained: {name} has no pretrained tag {tag!r} (known: {', '.join(known)})")
    quiet = _NoRandomInitWarning()
    if ckpt is not None:  # the file's weights are loaded right below
        logging.getLogger().addFilter(quiet)
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device="cpu")
    except RuntimeError as exc:  # missing download, no network
        raise UserError(f"cannot load weights {name}/{tag}: {exc}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    sha = None
    if ckpt is not None:
        try:
            net.load_state_dict(load_state_dict(ckpt), strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise UserError(f"--pretrained: {ckpt} does not fit {name}: {first}") from None
        sha = file_sha256(ckpt)
    net.eval().to(device)
    return LoadedModel(
        model=net,
        preprocess=preprocess,
        name=name,
        pretrained=str(ckpt) if ckpt is not None else (tag or "none"),
        weights_sha256=sha,
        config=open_clip.get_model_config(name),
    )


def preprocess_batch(loaded: LoadedModel, images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, S, S) float, through the model's own open_clip transform."""
    return preprocess_images(loaded.preprocess, images)


def preprocess_images(transform: Callable[[Image.Image], torch.Tensor], images: np.ndarray) -> torch.Tensor:
    """:func:`preprocess_batch` with the transform alone (what a data-loader worker process holds)."""
    return torch.stack([transform(Image.fromarray(img)) for img in images])


# ---- extraction -----------------------------------------------------------------------------------
@torch.no_grad()
def encode_layers(
    loaded: LoadedModel, pixels: torch.Tensor, layers: list[LayerSpec], tokens: TokenMode
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass: tokens of each requested layer (B, T, C) and ``encode_image`` (B, D).

    Tokens are CLS first, then patches in raster order, as the transformer holds them.
    """
    wanted = sorted({b for layer in layers for b in layer.blocks})
    out = loaded.model.visual.forward_intermediates(
        pixels, indices=[b - 1 for b in wanted], output_fmt="NLC", output_extra_tokens=True
    )
    by_block = {
        b: (cls_tok, patches)
        for b, cls_tok, patches in zip(wanted, out["image_intermediates_prefix"], out["image_intermediates"])
    }
    result = {}
    for layer in layers:
        cls_tok = torch.stack([by_block[b][0] for b in layer.blocks]).mean(0)
        patches = torch.stack([by_block[b][1] for b in layer.blocks]).mean(0)
        result[layer.name] = tokens.reduce(cls_tok, patches, loaded.grid_hw)
    return result, out["image_features"]


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str) -> Callable:
    """open_clip's tokenizer of a model, built once (it parses a BPE vocabulary)."""
    return open_clip.get_tokenizer(name)


@torch.no_grad()
def encode_captions(loaded: LoadedModel, captions: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """(B, K) caption strings -> (B, K, D) CLIP text embeddings; empty captions give zeros."""
    tokenizer = _tokenizer(loaded.name)
    b, k = captions.shape
    flat = [str(c) for c in captions.reshape(-1)]
    emb = loaded.model.encode_text(tokenizer(flat).to(device))
    present = torch.tensor([bool(c) for c in flat], device=emb.device)
    return (emb * present[:, None]).reshape(b, k, -1)
