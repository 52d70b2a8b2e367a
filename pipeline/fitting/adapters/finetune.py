"""Fine-tuning a pre-trained multi-subject model on a new subject: what is added, what is trained.

Modes (``--finetune``), after the new subject got a fresh input layer
(:meth:`.subjects.SubjectAdapter.add_subject`):

- ``all`` (MindEye2): everything shared is trained with the new input layer.
- ``lora``: rank-r LoRA adapters on every ``nn.Linear`` of the shared trunk, injected by the
  ``peft`` library (``inject_adapter_in_model``: ``W x + (alpha / r) B A x``, B initialised to
  zero so training starts from the pre-trained function); every pre-trained weight is frozen.
  ``alpha = r`` (scale 1): MindTuner does not publish its LoRA scale.
- ``skip-lora``: ``lora`` plus MindTuner's Skip-LoRA (Gong et al., arXiv 2404.12630): a non-linear
  low-rank path around each shared block, ``block(h) + U GELU(D h)`` with ``D`` (r x d_in),
  ``U`` (d_out x r, zero-initialised). The paper describes LoRA plus a non-linear skip path that
  learns the subject's "visual fingerprint"; its code is not public, so where the path starts and
  ends (around each residual block of mclip's encoders and each frequency block of litemind) and
  the activation (GELU, the trunk's own) are this module's reading.

Only the new subject's input layer (and, with brain experts, its gate) is trained besides the mode's
adapters; other subjects' input layers stay as pre-trained, so the fine-tuned model still predicts
them. :func:`set_trainable` also serves pre-training: stage ``pretrain`` trains everything but the
brain experts, stage ``experts`` (Wills Aligner's second stage) only the experts and their gates.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ...errors import UserError

MODES = ("all", "lora", "skip-lora")
STAGES = ("pretrain", "experts", *MODES)


class SkipLoRA(nn.Module):
    """``block(x) + U GELU(D x)``: a non-linear rank-r path around ``block`` (U starts at zero)."""

    def __init__(self, block: nn.Module, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.block = block
        self.skip_down = nn.Linear(d_in, rank, bias=False)
        self.skip_up = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.skip_up.weight)

    def forward(self, x):
        return self.block(x) + self.skip_up(F.gelu(self.skip_down(x)))


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, last = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, last, child)


def apply_finetune(model, mode: str, rank: int, subject: str) -> None:
    """Add the structure of a fine-tuning ``mode`` to ``model`` (a SubjectAdapter) and record it in
    ``model.finetune`` (its spec rebuilds the same structure on reload)."""
    if mode not in MODES:
        raise UserError(f"--finetune must be one of {', '.join(MODES)}, not {mode!r}")
    if model.finetune is not None:
        raise UserError(f"this model was already fine-tuned ({model.finetune['mode']} on {model.finetune['subject']}); "
                        "initialise from its pre-trained run instead")
    trunk = model.trunk
    if mode == "skip-lora":
        for name in trunk.skip_blocks():
            block = trunk.get_submodule(name)
            linears = _linears(block)
            _set_child(trunk, name, SkipLoRA(block, linears[0].in_features, linears[-1].out_features, rank))
    if mode in ("lora", "skip-lora"):
        from peft import LoraConfig, inject_adapter_in_model

        names = [n for n, m in trunk.named_modules() if isinstance(m, nn.Linear) and ".skip_" not in f".{n}"]
        device = next(trunk.parameters()).device
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names), trunk)
        trunk.to(device)
    model.finetune = {"mode": mode, "rank": rank, "subject": subject}


def set_trainable(model, stage: str, subject: str | None = None) -> dict[str, int]:
    """Freeze everything, then unfreeze what ``stage`` trains; returns {trainable, total} parameters."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r} (known: {', '.join(STAGES)})")
    experts = getattr(model, "experts", None)
    for p in model.parameters():
        p.requires_grad_(False)

    def train(module_or_param) -> None:
        for p in ([module_or_param] if isinstance(module_or_param, nn.Parameter) else module_or_param.parameters()):
            p.requires_grad_(True)

    if stage == "pretrain":
        for name, child in model.named_children():
            if name != "experts":
                train(child)
    elif stage == "experts":
        train(experts)
    else:
        train(model.inputs[subject])
        if experts is not None:
            train(experts.gates[subject])
        if stage == "all":
            train(model.trunk)
            train(model.missing)
            if experts is not None:
                train(experts)
        else:
            for name, p in model.trunk.named_parameters():
                if "lora_" in name or ".skip_" in f".{name}":
                    p.requires_grad_(True)
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}
