"""The demo's "pretrained" CLIP: the tiny open_clip tower trained contrastively on the demo's own
images and captions at make-demo time.

Why: a randomly initialised 6-block tower barely changes its input from block to block (linear
CKA of the token-mean features of block 1 vs block 6 is about 0.98), so no layer analysis can tell
its blocks apart, and zero-shot / text retrieval are at chance because the text tower is random.
A short CLIP training (symmetric InfoNCE between ``encode_image`` and ``encode_text`` of one
caption per image, as open_clip's ``ClipLoss`` on one device) makes the blocks differ and the two
towers agree, like a real pretrained CLIP at toy scale.

Deterministic for a seed: images are preprocessed once through the model's own transform, the
caption of each image and the batch order are drawn from a seeded generator, and training runs on
the CPU on one torch thread (the tiny model is fastest there, and the weights then do not depend on
the machine's core count). Cost grows with ``epochs * n_images``: the defaults (720 steps of 32
images) take about 45 s on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from ..features import clip


@dataclass(frozen=True)
class TowerTraining:
    """Settings of the make-demo CLIP training (``epochs=0`` keeps the random initialisation)."""

    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    clip_grad: float = 1.0


def train_tower(
    loaded: clip.LoadedModel, images: np.ndarray, captions: np.ndarray, cfg: TowerTraining, seed: int
) -> list[dict[str, float]]:
    """Train ``loaded.model`` in place on (N, H, W, 3) uint8 images and their (N, K) captions
    (empty strings mark missing ones); returns the loss of every epoch."""
    model = loaded.model
    if cfg.epochs <= 0:
        return []
    pixels = clip.preprocess_batch(loaded, images)
    tokens = open_clip.get_tokenizer(loaded.name)([str(c) for c in captions.reshape(-1)])
    tokens = tokens.reshape(*captions.shape, -1)
    present = torch.from_numpy(captions != "")
    if not present.any(1).all():
        raise ValueError("every demo image needs at least one caption")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, pixels, tokens, present, cfg, seed)
    finally:
        torch.set_num_threads(threads)


def _train(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor,
           cfg: TowerTraining, seed: int) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    n = len(pixels)
    steps = cfg.epochs * -(-n // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )
    model.train()
    history = []
    for epoch in range(cfg.epochs):
        # one present caption per image, drawn uniformly
        pick = torch.multinomial(present.float(), 1, generator=gen).squeeze(1)
        text = tokens[torch.arange(n), pick]
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            img = F.normalize(model.encode_image(pixels[idx]), dim=-1)
            txt = F.normalize(model.encode_text(text[idx]), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            labels = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            total += float(loss.detach()) * len(idx)
        history.append({"epoch": epoch + 1, "loss": total / n})
    model.eval()
    return history
