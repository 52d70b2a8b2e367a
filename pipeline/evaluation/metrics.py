"""Reconstruction and prediction metrics, following the MindEye2 protocol (shared/reference/nsd.md §5).

Metric functions take plain arrays of equal shape and return the mean over images as a float;
resizing is the caller's step (:func:`resize_images`, or :func:`evaluate`, which applies the whole
protocol):

- :func:`pixcorr` — Pearson r of all RGB values per image (§5.2), images at 425 px.
- :func:`ssim` — scikit-image >= 0.20 semantics: 2-D SSIM of ``rgb2gray`` images, Gaussian window,
  sigma 1.5, population covariance, data range 1 (§5.2), images at 425 px.
- :func:`two_way_identification` — ME's all-pairs two-way identification on flattened features;
  ties (and NaN correlations of constant features) count as failures; chance is 0.5 (§5.2).
- :func:`correlation_distance` — mean ``1 - r`` per image (EffNet-B, SwAV; lower is better).
- :func:`retrieval_top1` — top-1 among ``pool`` random samples, ``draws`` draws, legacy NumPy seed
  (§5.4); returns both directions in ME2's code orientation.
- :func:`prediction_quality` — predicted vs true target arrays: mean Pearson r over columns, mean
  cosine over rows.

Feature networks (AlexNet, InceptionV3, CLIP ViT-L/14, EfficientNet-B1, SwAV-ResNet50) are
described as data (:class:`FeatureNet`, :class:`FeatureMetric`, :data:`FEATURE_METRICS`). Their
weights come from a local file or the user's torch-hub / Hugging Face cache and are never downloaded
here; a missing file makes the metric ``{"unavailable": reason}`` in :func:`evaluate`, never a number
from random weights.

Conventions: Pearson r of a constant vector is taken as 0 in :func:`pixcorr`,
:func:`correlation_distance` and :func:`prediction_quality` (a blank reconstruction carries no
linear information), whereas :func:`two_way_identification` keeps ME's NaN, i.e. a failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..images import as_float_images
from ..fitting.scores import (  # noqa: F401  (re-exported: the metrics' public API)
    Retrieval,
    check_feats,
    correlation_distance,
    correlation_distance_each,
    cross_correlation,
    feature_rows,
    mean_report,
    prediction_quality,
    retrieval_failures,
    retrieval_top1,
    rowwise_pearson,
    two_way_failures,
    two_way_identification,
    two_way_value,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

EVAL_SIZE = 256
"""ME2 feeds GT and reconstructions to every metric at 256 px (``all_images.pt``)."""
PIXEL_SIZE = 425
"""PixCorr and SSIM resize to 425 px, bilinear (§5.2)."""


# ---- images -----------------------------------------------------------------------------------------
def _check_pair(gt: tuple[int, ...], rec: tuple[int, ...]) -> None:
    """Refuse two image arrays of shapes ``gt`` and ``rec`` that differ or are empty."""
    if gt != rec:
        raise UserError(
            f"ground truth {gt} and reconstructions {rec} differ in shape; resize first"
        )
    if not gt or gt[0] == 0:
        raise UserError("no images to evaluate")


def float_pairs(gt: np.ndarray, rec: np.ndarray, batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Matching float64 [0, 1] batches of two equal-shape (N, H, W, 3) image arrays, converted
    ``batch_size`` images at a time: uint8 stays uint8 until its batch, so the float64 copies (8x
    the bytes) cost one batch whatever N (1,200 clips x 6 frames at 512 px: 136 GB at once)."""
    _check_pair(np.shape(gt), np.shape(rec))
    for start in range(0, len(gt), batch_size):
        yield (as_float_images(gt[start : start + batch_size], "gt"),
               as_float_images(rec[start : start + batch_size], "rec"))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8/float images -> (N, 3, H, W) float32 tensor in [0, 1].

    uint8 goes to float32 directly (x / 255 in float32 equals float32(x / 255 in float64) for every
    byte value), without a float64 copy of the batch."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] == 3:
        tensor = torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return tensor.contiguous()
    return torch.from_numpy(as_float_images(arr).astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def resize_images(images: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """``transforms.Resize(size)``, bilinear, on (N, 3, H, W) float tensors.

    ``antialias=False`` is what ME1/ME2 ran (torchvision 0.15/0.16 tensor default); torchvision
    >= 0.17 defaults to True, which changes downscaled values slightly (§5.1).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    if images.shape[-2:] == (size, size):
        return images
    return resize(images, size, interpolation=InterpolationMode.BILINEAR, antialias=antialias)


def _to_hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).double().numpy()


# ---- low-level metrics -------------------------------------------------------------------------------
def pixcorr_each(gt: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Per-image Pearson r over all RGB values (see :func:`pixcorr`)."""
    return np.concatenate([rowwise_pearson(g.reshape(len(g), -1), r.reshape(len(r), -1))
                           for g, r in float_pairs(gt, rec)])


def pixcorr(gt: np.ndarray, rec: np.ndarray) -> float:
    """Mean over images of the Pearson r between all RGB values of GT and reconstruction."""
    return float(pixcorr_each(gt, rec).mean())


def ssim_each(gt: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Per-image SSIM (see :func:`ssim`)."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    return np.array([
        structural_similarity(
            rgb2gray(ri), rgb2gray(gi), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0,
        )
        for g, r in float_pairs(gt, rec) for gi, ri in zip(g, r)
    ])


def ssim(gt: np.ndarray, rec: np.ndarray) -> float:
    """Mean 2-D SSIM of the grayscale images (ME's call as scikit-image >= 0.20 evaluates it)."""
    return float(ssim_each(gt, rec).mean())


# ---- feature networks ----------------------------------------------------------------------------------
class MetricUnavailable(Exception):
    """A metric's network weights are not on this machine; the message says what is missing."""


@dataclass(frozen=True)
class FeatureNet:
    """A pretrained network that metrics read features from, and the input it expects.

    ``load(path)`` builds the network in eval mode from a local weights file, or from the user's
    cache when ``path`` is None; it raises :class:`MetricUnavailable` instead of downloading.
    """

    key: str  # the key of its local weights file in ``evaluate(weights={...})``
    load: Callable[[Path | None], nn.Module]
    size: int  # transforms.Resize(size), bilinear, before normalisation
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class FeatureMetric:
    """One reported metric: a network, the node whose output is the feature, and how it is scored."""

    name: str  # the name reported in the results, e.g. "AlexNet(2)"
    net: FeatureNet
    node: str | None  # torchvision feature-extraction node; None = the module's own output
    score: str  # "two_way" (higher is better) or "correlation_distance" (lower is better)


def torch_hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches ``url`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from ..features.clip import load_state_dict

    try:
        return load_state_dict(path)
    except UserError as exc:
        raise MetricUnavailable(str(exc).removeprefix("--pretrained: ")) from None


def _require(path: Path, what: str, how: str) -> Path:
    if not path.is_file():
        raise MetricUnavailable(f"{what} not found at {path} ({how})")
    return path


def load_torchvision(arch: str, weights: str, path: Path | None = None, **arch_kwargs) -> nn.Module:
    """A torchvision classifier with the weights of enum ``weights`` (e.g. ``AlexNet_Weights.IMAGENET1K_V1``),
    read from ``path`` or torch hub's checkpoint cache, where ``torchvision.models.<arch>(weights=...)``
    leaves them."""
    import torchvision

    enum = torchvision.models.get_weight(weights)
    file = Path(path) if path is not None else torch_hub_checkpoint(enum.url)
    _require(file, f"{weights} weights", f"download them once with torchvision.models.{arch}(weights='{weights}') "
             "or pass a local file")
    model = torchvision.models.get_model(arch, weights=None, num_classes=len(enum.meta["categories"]), **arch_kwargs)
    try:
        model.load_state_dict(_state_dict(file))
    except RuntimeError as exc:
        raise MetricUnavailable(f"{file} does not fit torchvision {arch}: {str(exc).splitlines()[0]}") from None
    return model.eval()


SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"
"""The checkpoint ``torch.hub.load('facebookresearch/swav:main', 'resnet50')`` loads (its hubconf)."""


def load_swav(path: Path | None = None) -> nn.Module:
    """SwAV ResNet-50, as facebookresearch/swav's hubconf builds it: torchvision resnet50 + the SwAV
    state dict (``module.`` stripped, projection head ignored, ``fc`` left random: unused here)."""
    import torchvision

    file = Path(path) if path is not None else torch_hub_checkpoint(SWAV_URL)
    _require(file, "SwAV ResNet-50 weights", "download them once with torch.hub.load('facebookresearch/swav:main', "
             "'resnet50') or pass a local file")
    model = torchvision.models.resnet50(weights=None)
    missing, _ = model.load_state_dict(_state_dict(file), strict=False)
    if any(not k.startswith("fc.") for k in missing):
        raise MetricUnavailable(f"{file} is not a SwAV ResNet-50 checkpoint (missing {missing[:3]}...)")
    return model.eval()


class EncodeImage(nn.Module):
    """An open_clip model whose forward is ``encode_image`` (the projected embedding)."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.clip = clip_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)


def load_openai_clip(path: Path | None = None) -> nn.Module:
    """OpenAI CLIP ViT-L/14 image encoder from an open_clip checkpoint file, or from the Hugging
    Face cache entry open_clip downloads for ``ViT-L-14``/``openai``; built with the activation
    those weights were trained with (:func:`pipeline.features.clip.resolve_architecture`: QuickGELU,
    as ``clip.load('ViT-L/14')``)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    from ..features.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, hf_weights, quiet_random_init, resolve_architecture
    from ..hub import hf_hub_cache

    arch = resolve_architecture(DEFAULT_MODEL, DEFAULT_PRETRAINED)
    if path is None:
        repo, files = hf_weights(arch.name, DEFAULT_PRETRAINED)
        hits = [try_to_load_from_cache(repo, name, cache_dir=hf_hub_cache()) for name in files]
        found = [h for h in hits if isinstance(h, str)]
        if not found:
            raise MetricUnavailable(
                f"OpenAI CLIP ViT-L/14 weights not found in {hf_hub_cache()} ({repo}; download them once "
                "with open_clip.create_model('ViT-L-14', pretrained='openai') or pass a local file)"
            )
        path = Path(found[0])
    _require(Path(path), "OpenAI CLIP ViT-L/14 weights", "pass an open_clip checkpoint file")
    state = _state_dict(Path(path))  # read first: a bad file fails before ViT-L is built
    with quiet_random_init():  # the weights follow
        model = open_clip.create_model(arch.name, pretrained=None, force_quick_gelu=arch.force_quick_gelu)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MetricUnavailable(f"{path} does not fit {arch.name}: {str(exc).splitlines()[0]}") from None
    return EncodeImage(model).eval()


ALEXNET = FeatureNet("alexnet", partial(load_torchvision, "alexnet", "AlexNet_Weights.IMAGENET1K_V1"), 256)
INCEPTION = FeatureNet(
    "inception_v3",
    partial(load_torchvision, "inception_v3", "Inception_V3_Weights.DEFAULT",
            aux_logits=True, transform_input=True, init_weights=False),  # as built with weights=DEFAULT
    342,
)
OPENAI_CLIP = FeatureNet("clip_vit_l14", load_openai_clip, 224, CLIP_MEAN, CLIP_STD)
EFFNET = FeatureNet("efficientnet_b1", partial(load_torchvision, "efficientnet_b1", "EfficientNet_B1_Weights.DEFAULT"), 255)
SWAV = FeatureNet("swav_resnet50", load_swav, 224)

FEATURE_METRICS: tuple[FeatureMetric, ...] = (
    FeatureMetric("AlexNet(2)", ALEXNET, "features.4", "two_way"),
    FeatureMetric("AlexNet(5)", ALEXNET, "features.11", "two_way"),
    FeatureMetric("InceptionV3", INCEPTION, "avgpool", "two_way"),
    FeatureMetric("CLIP", OPENAI_CLIP, None, "two_way"),
    FeatureMetric("EffNet-B", EFFNET, "avgpool", "correlation_distance"),
    FeatureMetric("SwAV", SWAV, "avgpool", "correlation_distance"),
)
"""ME2's feature metrics (§5.2-5.3): network, node, input size, scoring."""


@torch.no_grad()
def extract_features(
    model: nn.Module, net: FeatureNet, nodes: Sequence[str | None], images: torch.Tensor,
    device: str = "cpu", batch_size: int = 32,
) -> dict[str | None, np.ndarray]:
    """Features (N, d) float32 of (N, 3, H, W) [0, 1] images at each node: Resize(net.size), bilinear,
    normalise, forward. Node None is the module's own output."""
    from torchvision.models.feature_extraction import create_feature_extractor

    named = sorted({n for n in nodes if n is not None})
    model = model.to(device).eval()
    body = create_feature_extractor(model, return_nodes=named) if named else None
    mean = torch.tensor(net.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.std).view(1, 3, 1, 1)
    out: dict[str | None, np.ndarray] = {}
    for start in range(0, len(images), batch_size):
        x = ((resize_images(images[start : start + batch_size], net.size) - mean) / std).to(device)
        found = body(x) if body is not None else {}
        if None in nodes:
            found[None] = model(x)
        for node in nodes:
            feats = found[node].flatten(1).float().cpu().numpy()
            if node not in out:  # filled in place: no second copy from concatenating batches
                out[node] = np.empty((len(images), feats.shape[1]), np.float32)
            out[node][start : start + len(feats)] = feats
    return out


# ---- the whole protocol ----------------------------------------------------------------------------------
Result = dict[str, float | int | dict[str, str]]


def resized_images(images, size: int, antialias: bool = False, batch_size: int = 32) -> torch.Tensor:
    """(N, 3, size, size) float32 in [0, 1] from (N, H, W, 3) uint8/float images, converted and
    resized ``batch_size`` at a time.

    ``images`` is an array or any object with ``len()`` whose slices are image arrays (such as
    :class:`pipeline.store.LazyRows`), so full-size images are never all in memory, let alone as
    floats: 1000 reconstructions at 768 px are 1.8 GB as uint8 and 14 GB as float64, but 0.8 GB
    at 256 px as float32.
    """
    n = len(images)
    out: torch.Tensor | None = None
    for start in range(0, n, batch_size):
        batch = resize_images(to_tensor(np.asarray(images[start : start + batch_size])), size, antialias)
        if out is None:
            out = torch.empty((n, *batch.shape[1:]), dtype=torch.float32)
        out[start : start + len(batch)] = batch
    return out if out is not None else torch.empty((0, 3, size, size))


def evaluate(
    gt_images: np.ndarray,
    rec_images: np.ndarray,
    *,
    brain: np.ndarray | None = None,
    image: np.ndarray | None = None,
    metrics: Sequence[FeatureMetric] = FEATURE_METRICS,
    weights: Mapping[str, str | Path] | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    size: int = EVAL_SIZE,
    antialias: bool = False,
    pool: int = 300,
    draws: int = 30,
    seed: int = 42,
    per_image: dict[str, dict[str, Any]] | None = None,
) -> Result:
    """Every metric of the ME2 protocol that can run here; the others are ``{"unavailable": reason}``.

    ``gt_images``/``rec_images``: (N, H, W, 3) uint8 or [0, 1] float, row i of each for test image i
    (sizes may differ between the two), as arrays or lazy row sources read in batches
    (:func:`resized_images`). Both are resized to ``size`` (ME2: 256), then to 425 for
    PixCorr/SSIM and to each network's input size, batch by batch. ``brain``/``image``: (N, ...) predicted and true
    embeddings for retrieval (§5.4). ``weights`` maps a :class:`FeatureNet` key (``alexnet``,
    ``inception_v3``, ``clip_vit_l14``, ``efficientnet_b1``, ``swav_resnet50``) to a local file;
    absent keys are looked up in the torch-hub / Hugging Face caches. ``metrics`` can be replaced,
    e.g. by a test stand-in, which is then reported under its own name.

    ``per_image``, when given, receives per metric what :mod:`.bootstrap` resamples: ``{"scores": (n,)}``
    for means of per-image scores, ``{"fail": (n, n) bool, "pool": p}`` for pool statistics.
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - {m.net.key for m in metrics})
    if unknown:
        raise UserError(f"metric weights: unknown network {unknown} (known: {sorted({m.net.key for m in metrics})})")
    if len(gt_images) != len(rec_images):
        raise UserError(f"{len(gt_images)} ground-truth images but {len(rec_images)} reconstructions")
    if len(gt_images) < 2:
        raise UserError(f"need at least 2 test images to evaluate, got {len(gt_images)}")
    gt = resized_images(gt_images, size, antialias, batch_size)
    rec = resized_images(rec_images, size, antialias, batch_size)
    results: Result = {"n_images": len(gt)}

    px, ss = [], []
    for start in range(0, len(gt), batch_size):
        g = _to_hwc(resize_images(gt[start : start + batch_size], PIXEL_SIZE))
        r = _to_hwc(resize_images(rec[start : start + batch_size], PIXEL_SIZE))
        px.append(pixcorr_each(g, r))
        ss.append(ssim_each(g, r))
    details: dict[str, dict[str, Any]] = {"PixCorr": {"scores": np.concatenate(px)},
                                           "SSIM": {"scores": np.concatenate(ss)}}
    results["PixCorr"] = float(details["PixCorr"]["scores"].mean())
    results["SSIM"] = float(details["SSIM"]["scores"].mean())

    by_net: dict[str, list[FeatureMetric]] = {}
    for m in metrics:
        by_net.setdefault(m.net.key, []).append(m)
    for key, group in by_net.items():
        net = group[0].net
        try:
            model = net.load(Path(weights[key]) if key in weights else None)
        except MetricUnavailable as exc:
            results.update({m.name: {"unavailable": str(exc)} for m in group})
            continue
        nodes = [m.node for m in group]
        fg = extract_features(model, net, nodes, gt, device, batch_size)
        fr = extract_features(model, net, nodes, rec, device, batch_size)
        for m in group:
            if m.score == "two_way":
                details[m.name] = {"fail": two_way_failures(fg[m.node], fr[m.node]), "pool": 2}
                results[m.name] = two_way_value(details[m.name]["fail"])
            else:
                details[m.name] = {"scores": correlation_distance_each(fg[m.node], fr[m.node])}
                results[m.name] = float(details[m.name]["scores"].mean())
        del model

    results.update(_retrieval(brain, image, len(gt), pool, draws, seed))
    if per_image is not None:
        if not isinstance(results["retrieval_image_to_brain"], dict):
            for key, fail in zip(("retrieval_image_to_brain", "retrieval_brain_to_image"), retrieval_failures(brain, image)):
                details[key] = {"fail": fail, "pool": pool}
        per_image.update(details)
    return results


def _retrieval(brain, image, n: int, pool: int, draws: int, seed: int) -> Result:
    keys = ("retrieval_image_to_brain", "retrieval_brain_to_image")
    if brain is None or image is None:
        return {k: {"unavailable": "no brain/image embeddings given"} for k in keys}
    if len(brain) != n or len(image) != n:
        raise UserError(f"retrieval needs one brain and one image embedding per test image ({n}); "
                        f"got {len(brain)} and {len(image)}")
    if pool > n:
        return {k: {"unavailable": f"pool of {pool} is larger than the {n} test images"} for k in keys}
    return dict(zip(keys, retrieval_top1(brain, image, pool=pool, draws=draws, seed=seed)))
