"""The contrastive and cosine losses under CPU bf16 autocast equal float32 (loss and gradient).

``.float()`` does not leave autocast: without autocast disabled around the similarities their
matmul runs in bf16 on a GPU, and CPU bf16 autocast reproduces that here. The shape is Lite-Mind's:
B = 64 flattened 257 x 768 targets at temperature e^-8 (logit scale e^8).
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.fitting.adapters.losses import info_nce, mse, token_cosine

B, TOKENS, WIDTH = 64, 257, 768


def _pair(kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets): an untrained model's random predictions, or near-duplicate targets
    (64 small perturbations of one vector) with predictions near them; neither saturates the softmax."""
    if kind == "random":
        return torch.randn(B, TOKENS, WIDTH, generator=gen), torch.randn(B, TOKENS, WIDTH, generator=gen)
    true = torch.randn(1, TOKENS, WIDTH, generator=gen) + 0.02 * torch.randn(B, TOKENS, WIDTH, generator=gen)
    return true + 0.02 * torch.randn(B, TOKENS, WIDTH, generator=gen), true


def _loss_and_grad(loss, pred: torch.Tensor, true: torch.Tensor, autocast: bool) -> tuple[float, torch.Tensor]:
    p = pred.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = loss(p, true)
    value.backward()
    return value.item(), p.grad


@pytest.mark.parametrize("kind", ["random", "near_duplicates"])
@pytest.mark.parametrize("name", ["info_nce", "info_nce_one_way", "token_cosine", "mse"])
def test_losses_under_bf16_autocast_equal_float32(kind: str, name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    pred, true = _pair(kind, gen)
    temperature = math.exp(-8)
    loss = {
        "info_nce": lambda p, t: info_nce(p, t, temperature),
        "info_nce_one_way": lambda p, t: info_nce(p, t, temperature, symmetric=False),
        "token_cosine": token_cosine,
        "mse": mse,
    }[name]
    ref, ref_grad = _loss_and_grad(loss, pred, true, autocast=False)
    low, low_grad = _loss_and_grad(loss, pred, true, autocast=True)
    assert ref_grad.norm() > 0 and low == pytest.approx(ref, rel=1e-4)
    assert float((low_grad - ref_grad).norm() / ref_grad.norm()) <= 1e-4
