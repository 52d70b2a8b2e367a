"""BrainCLIP tasks on predicted CLIP embeddings: zero-shot category decoding and fMRI->image/text
retrieval.

- each image's categories come from the run's dataset (:meth:`pipeline.data.dataset.Dataset.categories`;
  NSD: COCO's ``instances_<cocoSplit>.json`` through the image's ``cocoId``, as a multi-hot (n, K) matrix).
- :func:`class_embeddings` turns category names into (K, D) text embeddings with the CLIP model's
  own text tower (open_clip tokenizer + ``encode_text``), averaged over prompt templates.
- :func:`zero_shot_accuracy` ranks the categories by cosine similarity to each predicted image
  embedding; a top-k guess is correct if any of the k best is one of the image's categories.
- :func:`caption_targets` averages an image's caption embeddings (the cache's ``text_embeds``) into
  one text target, for fMRI->text retrieval with :func:`pipeline.evaluation.metrics.retrieval_top1`
  (fMRI->image retrieval uses the cached ``image_embeds`` the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import UserError
from ..features.clip import LoadedModel, encode_captions

TEMPLATES = ("a photo of a {}.",)
"""Prompt templates; CLIP's zero-shot ImageNet set is longer, one keeps the task cheap and clear."""


def class_embeddings(loaded: LoadedModel, names: Sequence[str], templates: Sequence[str] = TEMPLATES,
                     device: str = "cpu") -> np.ndarray:
    """(K, D) unit-norm text embeddings of category names, mean over prompt templates."""
    prompts = np.array([[t.format(name) for t in templates] for name in names])
    emb = encode_captions(loaded, prompts, device).float().cpu().numpy()  # (K, T, D)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.mean(1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def zero_shot_accuracy(pred: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                       topk: Sequence[int] = (1, 5), hits: dict[str, np.ndarray] | None = None) -> dict[str, float | int]:
    """Top-k category accuracy of predicted image embeddings (n, D) against class embeddings (K, D).

    ``labels`` (n, K) is multi-hot; images without any category are left out and counted in
    ``n_unlabelled``. Ties between categories go to the lower column. ``hits``, when given, receives
    ``topk`` -> (n,) per-image 1.0 / 0.0, NaN for the unlabelled images (for the bootstrap).
    """
    pred = np.asarray(pred, dtype=np.float64)
    class_emb = np.asarray(class_emb, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if pred.ndim != 2 or class_emb.ndim != 2 or pred.shape[1] != class_emb.shape[1]:
        raise UserError(f"predictions {pred.shape} and class embeddings {class_emb.shape} must be (n, D) and (K, D)")
    if labels.shape != (len(pred), len(class_emb)):
        raise UserError(f"labels must be (n, K) = {(len(pred), len(class_emb))}, got {labels.shape}")
    too_big = [k for k in topk if not 1 <= k <= len(class_emb)]
    if too_big:
        raise UserError(f"top-k must be between 1 and the {len(class_emb)} categories, not {too_big}")
    scored = labels.any(1)
    if not scored.any():
        raise UserError("none of the images has a category")
    class_unit = class_emb / np.maximum(np.linalg.norm(class_emb, axis=1, keepdims=True), 1e-12)
    sim = pred[scored] @ class_unit.T  # ranking by cosine: the prediction's own norm does not matter
    order = np.argsort(-sim, axis=1, kind="stable")
    ranked = np.take_along_axis(labels[scored], order, 1)  # ranked[i, r]: the r-th best guess is right
    found = {f"top{k}": ranked[:, :k].any(1) for k in topk}
    if hits is not None:
        for key, value in found.items():
            hits[key] = np.full(len(pred), np.nan)
            hits[key][scored] = value
    result: dict[str, float | int] = {key: float(value.mean()) for key, value in found.items()}
    result.update(n_scored=int(scored.sum()), n_unlabelled=int((~scored).sum()))
    return result


def caption_targets(text_embeds: np.ndarray) -> np.ndarray:
    """(n, K, D) caption embeddings -> (n, D): mean of each image's unit-norm non-empty captions
    (empty captions are stored as zero rows)."""
    emb = np.asarray(text_embeds, dtype=np.float64)
    if emb.ndim != 3:
        raise UserError(f"text_embeds must be (n, captions, D), got shape {emb.shape}")
    norm = np.linalg.norm(emb, axis=-1, keepdims=True)
    present = norm > 0
    unit = np.divide(emb, norm, out=np.zeros_like(emb), where=present)
    count = present.sum(1)
    if (count == 0).any():
        raise UserError(f"{int((count == 0).sum())} images have no caption embedding")
    return unit.sum(1) / count
