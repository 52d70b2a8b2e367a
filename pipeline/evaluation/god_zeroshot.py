"""The GOD zero-shot protocol (BrainCLIP's zero-shot category decoding, Lite-Mind's zero-shot
classification): a decoder trained on the 150 training categories predicts a CLIP embedding for each
test image's fMRI (repetitions averaged); each prediction is classified among the held-out test
classes (50 in the release) by cosine similarity to the classes' text embeddings (top-1 / top-5), and
matched against the test images' own CLIP image embeddings (fMRI->image retrieval among all test
images, top-1).

Prompts: CLIP's 80 ImageNet templates (``"a bad photo of a {}."`` ...), taken from open_clip's copy of
OpenAI's list (``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``) so they match CLIP's own
zero-shot ImageNet evaluation; BrainCLIP's paper does not list its templates in the project's
reference files. Class embeddings average the unit-norm prompt embeddings (as CLIP does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from ..data.god import synset_of
from ..errors import UserError
from ..features.clip import LoadedModel
from .metrics import retrieval_top1
from .zeroshot import class_embeddings, zero_shot_accuracy

PROTOCOL = "god-zeroshot"
TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
"""CLIP's 80 ImageNet prompt templates as format strings."""
TEMPLATE_SET = "openai-imagenet-80"


def held_out_classes(train_stimuli: Sequence[str], test_stimuli: Sequence[str]) -> list[str]:
    """Sorted test synsets, after checking that none of them has a training image (zero-shot)."""
    train = {synset_of(s) for s in train_stimuli}
    test = sorted({synset_of(s) for s in test_stimuli})
    shared = [s for s in test if s in train]
    if shared:
        raise UserError(f"{len(shared)} test categories also appear in training, so the test is not zero-shot: "
                        f"{', '.join(shared[:5])}")
    return test


def class_text_embeddings(loaded: LoadedModel, names: Sequence[str], device: str = "cpu") -> np.ndarray:
    """(K, D) text embeddings of the class names over :data:`TEMPLATES`."""
    return class_embeddings(loaded, names, TEMPLATES, device)


def god_zeroshot(pred: np.ndarray, stimuli: Sequence[str], class_emb: np.ndarray, class_synsets: Sequence[str],
                 image_emb: np.ndarray | None = None, topk: Sequence[int] = (1, 5)) -> dict[str, float | int | str]:
    """Zero-shot metrics of predicted embeddings ``pred`` (n, D), one row per test stimulus id.

    ``class_emb`` (K, D) are the held-out classes' text embeddings in ``class_synsets`` order; every
    stimulus's synset must be one of them. ``image_emb`` (n, D), the test images' CLIP embeddings in
    ``stimuli`` order, adds fMRI->image top-1 retrieval among the n images. Chance levels are k/K and 1/n.
    """
    pred = np.asarray(pred, dtype=np.float64)
    if pred.ndim != 2 or len(pred) != len(stimuli):
        raise UserError(f"predictions {pred.shape} must have one row per test stimulus ({len(stimuli)})")
    column = {s: j for j, s in enumerate(class_synsets)}
    if len(column) != len(class_synsets):
        raise UserError("class synsets must be distinct")
    unknown = sorted({synset_of(s) for s in stimuli} - set(column))
    if unknown:
        raise UserError(f"{len(unknown)} test synsets have no class embedding: {', '.join(unknown[:5])}")
    labels = np.zeros((len(stimuli), len(class_synsets)), bool)
    labels[np.arange(len(stimuli)), [column[synset_of(s)] for s in stimuli]] = True
    acc = zero_shot_accuracy(pred, class_emb, labels, topk)
    k = len(class_synsets)
    result: dict[str, float | int | str] = {"protocol": PROTOCOL, "templates": TEMPLATE_SET, "n_classes": k,
                                            "n_test": len(stimuli)}
    for t in topk:
        result[f"top{t}"] = acc[f"top{t}"]
        result[f"chance_top{t}"] = t / k
    if image_emb is not None:
        image_emb = np.asarray(image_emb, dtype=np.float64)
        if image_emb.shape != pred.shape:
            raise UserError(f"image embeddings {image_emb.shape} must match the predictions {pred.shape}")
        ret = retrieval_top1(pred, image_emb, pool=len(pred), draws=1)
        result["fmri_to_image_top1"] = ret.brain_to_image
        result["chance_fmri_to_image_top1"] = 1 / len(pred)
    return result
