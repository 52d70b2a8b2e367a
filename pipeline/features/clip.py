"""CLIP model loading and per-layer token extraction (open_clip).

Layers are named 1-based, as in shared/DESIGN.md: block k's output, 24 = last block of ViT-L/14
(before ``ln_post``). open_clip's ``forward_intermediates`` is 0-based and returns the CLS token
separately; :func:`encode_layers` converts both and returns CLS first, then the patch tokens.
``K:proj`` is block K's tokens through ``ln_post`` and ``visual.proj``, every token (the 257x768
target of MindEye1, Lite-Mind, Brain-Diffuser); token modes apply after the projection.

Activation: OpenAI's (and some other) weights were trained with QuickGELU, while open_clip's plain
architecture names (``ViT-L-14``) build GELU and only warn on a mismatch. :func:`resolve_architecture`
reads the tag's own pretrained config (``quick_gelu``) and builds the matching architecture for
every model/tag pair; a mismatch that remains is a :class:`UserError`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from ..hub import hf_hub_cache
from .merge import merge_tokens

DEFAULT_MODEL = "ViT-L-14"
"""The CLIP every stage defaults to (and the metrics' CLIP): OpenAI's ViT-L/14, as the NSD literature."""
DEFAULT_PRETRAINED = "openai"
MODEL_CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
"""Configs shipped with the project (the demo's tiny ViT), usable by name like open_clip's own."""
SIZES_SUFFIX = "__sizes"
"""``layers/<name>__sizes``: how many original tokens each merged token holds (metadata, not a target)."""


# ---- layer and token specs ------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """One cached array: a block (``16``), a block projected to the embedding space (``24:proj``)
    or an aggregate over a range (``11-20:mean``)."""

    blocks: tuple[int, ...]  # 1-based
    aggregate: str | None = None
    project: bool = False  # ln_post -> visual.proj on every token

    @property
    def name(self) -> str:
        if self.project:
            return f"{self.blocks[0]}_proj"
        if self.aggregate is None:
            return str(self.blocks[0])
        return f"{self.blocks[0]}-{self.blocks[-1]}_{self.aggregate}"


_LAYER_RE = re.compile(r"^(\d+)(?:-(\d+):(mean)|:(proj))?$")


def parse_layers(spec: str, n_blocks: int) -> list[LayerSpec]:
    """Parse ``"8,16,24,11-20:mean,24:proj"`` and check every block against the model's 1..n_blocks.

    >>> [layer.name for layer in parse_layers("8,16,24,11-20:mean,24:proj", 24)]
    ['8', '16', '24', '11-20_mean', '24_proj']
    >>> parse_layers("25", 24)
    Traceback (most recent call last):
    pipeline.errors.UserError: --layers: '25' is out of range; this model has blocks 1..24 (1-based)
    """
    layers: list[LayerSpec] = []
    for item in (s.strip() for s in spec.split(",")):
        m = _LAYER_RE.match(item)
        if not m:
            raise UserError(
                f"--layers: cannot parse {item!r}; use block numbers (8,16,24), ranges with an "
                "aggregate (11-20:mean) or a projected block (24:proj)"
            )
        lo, hi, agg = int(m[1]), int(m[2] or m[1]), m[3]
        if not (1 <= lo <= hi <= n_blocks):
            raise UserError(
                f"--layers: {item!r} is out of range; this model has blocks 1..{n_blocks} (1-based)"
            )
        layers.append(LayerSpec(tuple(range(lo, hi + 1)), agg, project=bool(m[4])))
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise UserError(f"--layers: duplicate layers in {spec!r}")
    return layers


@dataclass(frozen=True)
class TokenMode:
    """How the (1 + P) tokens of a block are reduced: ``all``, ``cls``, ``mean``, ``grid:K``
    (CLS + patches average-pooled to a K x K grid) or ``merge:K`` (CLS + K merged tokens, see
    :mod:`.merge`; their sizes are stored beside them)."""

    kind: str
    k: int = 0

    @classmethod
    def parse(cls, spec: str) -> TokenMode:
        if spec in ("all", "cls", "mean"):
            return cls(spec)
        m = re.fullmatch(r"(grid|merge):(\d+)", spec)
        if m and int(m[2]) >= 1:
            return cls(m[1], int(m[2]))
        raise UserError(f"--tokens must be all, cls, mean, grid:K or merge:K (K >= 1), not {spec!r}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind in ("grid", "merge") else self.kind

    @property
    def has_sizes(self) -> bool:
        """Whether each token array comes with a ``__sizes`` array (merged tokens)."""
        return self.kind == "merge"

    def check(self, grid_hw: tuple[int, int]) -> None:
        """Fail early (before any output is written) when the mode does not fit the patch grid."""
        if self.kind == "grid" and self.k > min(grid_hw):
            raise UserError(f"--tokens grid:{self.k} is finer than the model's {grid_hw} patch grid")
        n_patches = grid_hw[0] * grid_hw[1]
        if self.kind == "merge" and self.k >= n_patches:
            raise UserError(f"--tokens merge:{self.k} must merge into fewer than the model's {n_patches} patches")

    def n_tokens(self, n_patches: int) -> int:
        return {"all": 1 + n_patches, "cls": 1, "mean": 1, "grid": 1 + self.k**2, "merge": 1 + self.k}[self.kind]

    def describe(self) -> str:
        """The token layout, for the store's attrs."""
        return {
            "all": "CLS, then patches in raster order", "cls": "CLS only", "mean": "mean of patch tokens",
            "grid": f"CLS, then patches average-pooled to a {self.k}x{self.k} grid",
            "merge": f"CLS, then {self.k} merged patch tokens (size-weighted means, ordered by first patch); "
                     "layers/<name>__sizes holds how many original tokens each one holds (CLS = 1)",
        }[self.kind]

    def reduce(
        self, cls_tok: torch.Tensor, patches: torch.Tensor, grid_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, C) CLS and (B, P, C) patches -> (B, T, C) tokens of this mode, and (B, T) int
        sizes for ``merge:K`` (None otherwise)."""
        if self.kind == "all":
            return torch.cat([cls_tok, patches], dim=1), None
        if self.kind == "cls":
            return cls_tok, None
        if self.kind == "mean":
            return patches.mean(dim=1, keepdim=True), None
        self.check(grid_hw)
        if self.kind == "merge":
            return merge_tokens(cls_tok, patches, grid_hw, self.k)
        b, p, c = patches.shape
        grid = patches.transpose(1, 2).reshape(b, c, *grid_hw)
        pooled = F.adaptive_avg_pool2d(grid, self.k).flatten(2).transpose(1, 2)
        return torch.cat([cls_tok, pooled], dim=1), None


# ---- model loading --------------------------------------------------------------------------------
ACTIVATIONS = ("auto", "gelu", "quick_gelu")


@dataclass(frozen=True)
class Architecture:
    """What :func:`resolve_architecture` decided: the open_clip name to build and its activation."""

    name: str  # the open_clip model name built (e.g. ViT-L-14-quickgelu)
    quick_gelu: bool
    force_quick_gelu: bool  # name's own config is GELU: create_model(force_quick_gelu=True)

    @property
    def activation(self) -> str:
        return "quick_gelu" if self.quick_gelu else "gelu"

    @property
    def config(self) -> dict:
        """open_clip's model config of what is built (``quick_gelu`` as resolved)."""
        return {**open_clip.get_model_config(self.name), "quick_gelu": self.quick_gelu}


def _act(quick: bool) -> str:
    return "QuickGELU" if quick else "GELU"


def resolve_architecture(name: str, tag: str | None, activation: str = "auto") -> Architecture:
    """The architecture that fits the weights of ``name``/``tag``.

    ``auto``: the activation the tag's open_clip pretrained config names (``quick_gelu``), or the
    model config's own for a checkpoint file or no weights. For a QuickGELU tag on a GELU config,
    open_clip's own ``<name>-quickgelu`` config is used when it is the same architecture (and holds
    the tag), else ``force_quick_gelu``. Forcing the other activation than a tag's is refused.
    """
    if activation not in ACTIVATIONS:
        raise UserError(f"--activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    own = bool(open_clip.get_model_config(name).get("quick_gelu", False))
    trained = None if tag is None else bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    wanted = {"auto": own if trained is None else trained, "gelu": False, "quick_gelu": True}[activation]
    if trained is not None and wanted != trained:
        raise UserError(
            f"--activation {activation}: the {name}/{tag} weights were trained with {_act(trained)}; a "
            f"{_act(wanted)} tower would compute wrong features (use --activation auto)"
        )
    if wanted == own:
        return Architecture(name, wanted, False)
    if wanted:
        twin = f"{name}-quickgelu"
        if (
            twin in open_clip.list_models()
            and open_clip.get_model_config(twin) == {**open_clip.get_model_config(name), "quick_gelu": True}
            and (tag is None or open_clip.get_pretrained_cfg(twin, tag) == open_clip.get_pretrained_cfg(name, tag))
        ):
            return Architecture(twin, True, False)
        return Architecture(name, True, True)
    raise UserError(
        f"--activation gelu: {name}'s config builds QuickGELU; give a GELU model config instead"
    )


def _built_activation(net: open_clip.CLIP) -> str | None:
    """The activation of the vision tower's MLPs as built (None when it has no such MLPs)."""
    for module in net.visual.modules():
        if isinstance(module, open_clip.transformer.QuickGELU):
            return "quick_gelu"
        if isinstance(module, torch.nn.GELU):
            return "gelu"
    return None


def hf_weights(name: str, tag: str) -> tuple[str, list[str]]:
    """The Hugging Face repo id and file names open_clip looks for a tag's weights under, in its
    order (``download_pretrained``: a safetensors file first, then the torch pickle)."""
    repo, file = os.path.split(open_clip.get_pretrained_cfg(name, tag).get("hf_hub", ""))
    file = file or "open_clip_pytorch_model.bin"
    safe = "open_clip_model.safetensors" if file == "open_clip_pytorch_model.bin" else (
        file[:-4] + ".safetensors" if file.endswith((".bin", ".pth")) else None)
    return repo, [f for f in (safe, file) if f]


@dataclass
class LoadedModel:
    """An open_clip model with the facts the cache records about it."""

    model: open_clip.CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]
    name: str
    pretrained: str  # tag, file path or "none"
    weights_sha256: str | None
    config: dict
    architecture: Architecture

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

    def check_projection(self) -> None:
        """``K:proj`` needs ``ln_post`` over the block's width and a ``visual.proj`` matrix."""
        visual = self.model.visual
        if visual.proj is None:
            raise UserError(f"--layers K:proj: {self.name} has no visual projection (visual.proj is None)")
        if visual.attn_pool is not None:
            raise UserError(
                f"--layers K:proj: {self.name} pools tokens with attention before ln_post/proj, so projected "
                "block tokens are undefined for it"
            )

    def projection_note(self) -> str:
        """How ``layers/<last>_proj`` relates to ``image_embeds`` for this tower's pooling."""
        visual = self.model.visual
        if visual.pool_type == "tok":
            return "token 0 (CLS) of layers/<last block>_proj equals image_embeds"
        if visual.pool_type == "avg" and not visual.final_ln_after_pool:
            return "the mean of the patch tokens of layers/<last block>_proj equals image_embeds"
        return f"pool_type {visual.pool_type!r}: image_embeds is not a token of layers/<last block>_proj"

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
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextmanager
def quiet_random_init(quiet: bool = True) -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning (root logger) where it says nothing: the
    weights are loaded right after, or random weights were asked for (``--pretrained none``)."""
    hide = _NoRandomInitWarning()
    if quiet:
        logging.getLogger().addFilter(hide)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(hide)


def _first_lines(exc: Exception, n: int = 2, limit: int = 300) -> str:
    """torch's load_state_dict errors start with a header line: keep it and the first detail, on one line."""
    text = "; ".join([line.strip() for line in str(exc).splitlines() if line.strip()][:n])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_model(
    model: str, pretrained: str | None = DEFAULT_PRETRAINED, device: str = "cpu", activation: str = "auto"
) -> LoadedModel:
    """Build an open_clip model by name or config and load weights from a tag, a file or none.

    ``pretrained`` may be an open_clip tag (``openai``, ``laion2b_s32b_b82k``...), a local
    checkpoint file, or ``none``/``None`` for random initialisation (tests and timing only). Tags
    load through open_clip from the Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``; offline with
    ``HF_HUB_OFFLINE=1``). ``activation``: see :func:`resolve_architecture`.
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
    arch = resolve_architecture(name, tag, activation)
    try:
        with quiet_random_init(tag is None), warnings.catch_warnings():
            warnings.filterwarnings("error", message="QuickGELU mismatch")
            net, _, preprocess = open_clip.create_model_and_transforms(
                arch.name, pretrained=tag, device="cpu", force_quick_gelu=arch.force_quick_gelu,
                cache_dir=str(hf_hub_cache()),
            )
    except UserWarning as exc:
        raise UserError(f"{name}/{tag}: {exc}") from None
    except (RuntimeError, AssertionError, ValueError, KeyError) as exc:  # weights missing (offline) or not fitting
        first = _first_lines(exc) or type(exc).__name__
        if "Failed to download" in first:
            repo, files = hf_weights(arch.name, tag)
            raise UserError(
                f"--pretrained {tag}: {name} weights not found in the Hugging Face cache {hf_hub_cache()} "
                f"(open_clip reads {repo}/{' or '.join(files)}; download them once online, or set HF_HUB_CACHE)"
            ) from None
        raise UserError(f"--pretrained {tag}: the cached weights do not fit {arch.name}: {first}") from None
    if not isinstance(net.visual, open_clip.transformer.VisionTransformer):
        raise UserError(f"--model {name}: extract-clip reads open_clip VisionTransformer towers, not {type(net.visual).__name__}")
    built = _built_activation(net)
    if built is not None and built != arch.activation:
        raise UserError(f"{arch.name}: built a {built} tower but the weights need {arch.activation}")
    sha = None
    if ckpt is not None:
        try:
            net.load_state_dict(load_state_dict(ckpt), strict=True)
        except RuntimeError as exc:
            raise UserError(f"--pretrained: {ckpt} does not fit {name}: {_first_lines(exc)}") from None
        sha = file_sha256(ckpt)
    net.eval().to(device)
    return LoadedModel(
        model=net,
        preprocess=preprocess,
        name=name,
        pretrained=str(ckpt) if ckpt is not None else (tag or "none"),
        weights_sha256=sha,
        config=arch.config,
        architecture=arch,
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
    """One forward pass: tokens of each requested layer (B, T, C), ``<name>__sizes`` (B, T) for
    merged tokens, and ``encode_image`` (B, D).

    Tokens are CLS first, then patches in raster order, as the transformer holds them; ``K:proj``
    layers are ``ln_post`` then ``@ visual.proj`` on every token, before the token mode.
    """
    wanted = sorted({b for layer in layers for b in layer.blocks})
    visual = loaded.model.visual
    out = visual.forward_intermediates(
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
        if layer.project:
            projected = visual.ln_post(torch.cat([cls_tok, patches], dim=1)) @ visual.proj
            cls_tok, patches = projected[:, :1], projected[:, 1:]
        result[layer.name], sizes = tokens.reduce(cls_tok, patches, loaded.grid_hw)
        if sizes is not None:
            result[layer.name + SIZES_SUFFIX] = sizes
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
