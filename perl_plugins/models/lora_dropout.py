"""LoRA dropout without a saved copy of the adapter's input.

peft computes ``lora_B(lora_A(dropout(x)))``, so autograd keeps, per adapted projection, the
dropped copy of ``x`` for ``lora_A``'s weight gradient (4 bytes an element in fp32; q, k and v each
keep their own copy of the same input) and the dropout mask (1 byte). :func:`recompute_lora_dropout`
folds the dropout into ``lora_A``: the forward keeps ``x`` itself (alive anyway, and one tensor for
every projection that reads it) and a seed; the backward regenerates the mask from the seed. The
mask has nn.Dropout's distribution (kept with probability ``1 - p``, scaled by ``1 / (1 - p)``), and
the gradients are exactly those of the dropped copy. The seed comes from torch's global CPU
generator, so ``set_seed`` reproduces a run and gradient checkpointing (which restores the RNG
state before recomputing) regenerates the same masks.
"""

from __future__ import annotations

from typing import Any

import torch  # subclasses torch classes: the lora plugin imports this module only when it prepares a model
import torch.nn.functional as F
from torch import nn

_SEED_HIGH = 2**62


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropout multiplier for ``x`` drawn from ``seed``: 0 with probability ``p``, else ``1 / (1 - p)``."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.empty_like(x).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)


class DroppedLinear(torch.autograd.Function):
    """``F.linear(x * dropout_mask(x, p, seed), weight)`` that saves ``x`` and the seed, not the product."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return F.linear(x * dropout_mask(x, p, seed), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        # Under autocast the forward ran in a lower precision than x / weight: compute in grad's dtype,
        # return each gradient in its input's dtype (as autograd does through autocast's casts).
        mask = dropout_mask(x, ctx.p, ctx.seed).to(grad.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad @ weight.to(grad.dtype)) * mask).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = (x.to(grad.dtype) * mask).reshape(-1, x.shape[-1])
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ dropped).to(weight.dtype)
        return grad_x, grad_w, None, None


class DroppedLoraA(nn.Linear):
    """peft's ``lora_A`` with its dropout folded in (the class :func:`recompute_lora_dropout` gives
    it). The ``nn.Dropout`` stays a submodule and its ``p`` is read at every call, so whatever sets
    dropout rates on the model (trl's ``disable_dropout``) still reaches it."""

    dropout: nn.Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = float(self.dropout.p)
        if not self.training or p == 0.0:
            return super().forward(x)
        seed = int(torch.randint(_SEED_HIGH, (1,)))
        return DroppedLinear.apply(x, self.weight, p, seed)


def recompute_lora_dropout(model: nn.Module) -> int:
    """Fold every plain LoRA linear adapter's dropout (``nn.Dropout``, p > 0) into its ``lora_A``
    (the dropout moves under it; ``lora_dropout`` holds ``nn.Identity``); parameters, state-dict keys
    and the peft config stay as they are. Returns how many adapters changed."""
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {})
        for name, dropout in list(dropouts.items()):
            lora_a = module.lora_A[name] if name in getattr(module, "lora_A", {}) else None
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0.0 or name in variants:
                continue
            if type(lora_a) is not nn.Linear:  # embeddings, convolutions, already folded
                continue
            lora_a.__class__ = DroppedLoraA
            lora_a.dropout = dropout
            dropouts[name] = nn.Identity()
            changed += 1
    return changed
