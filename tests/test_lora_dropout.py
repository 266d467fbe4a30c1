"""LoRA dropout folded into lora_A (models/lora_dropout.py) against a direct re-computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from perl_plugins.models.lora_dropout import DroppedLinear, DroppedLoraA, dropout_mask, recompute_lora_dropout


def test_mask_is_dropout_distribution_and_repeats_from_its_seed():
    x = torch.ones(200, 500)
    mask = dropout_mask(x, 0.25, seed=7)
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert (mask == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(mask, dropout_mask(x, 0.25, seed=7))
    assert not torch.equal(mask, dropout_mask(x, 0.25, seed=8))


def test_dropped_linear_equals_linear_of_the_dropped_copy():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    grad_out = torch.randn(3, 5, 4)
    out = DroppedLinear.apply(x, weight, 0.3, 11)
    out.backward(grad_out)

    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    direct = F.linear(x2 * dropout_mask(x2, 0.3, 11), w2)
    direct.backward(grad_out)
    torch.testing.assert_close(out, direct)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_dropped_linear_saves_the_input_not_a_dropped_copy():
    x = torch.randn(16, 64, requires_grad=True)
    weight = torch.randn(4, 64, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DroppedLinear.apply(x, weight, 0.1, 3)
    assert {t.untyped_storage().data_ptr() for t in saved} == {x.untyped_storage().data_ptr(), weight.data_ptr()}


class TwoProjections(nn.Module):
    """q and k read the same input, as in attention."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) * self.k_proj(x)


def _peft(p: float = 0.2):
    torch.manual_seed(0)
    model = get_peft_model(
        TwoProjections(), LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q_proj", "k_proj"])
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B makes the adapter path count
            nn.init.normal_(param)
    return model


def _saved(model: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Storage -> a tensor autograd saved from it in a forward (parameters left out)."""
    storages: dict[int, torch.Tensor] = {}
    params = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return storages


def test_folded_peft_layers_match_the_formula_with_the_regenerated_masks():
    model = _peft()
    assert recompute_lora_dropout(model) == 2
    assert recompute_lora_dropout(model) == 0  # already folded
    layer = model.base_model.model.q_proj
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    assert isinstance(layer.lora_A["default"], DroppedLoraA) and layer.lora_A["default"].dropout.p == 0.2
    x = torch.randn(6, 32, requires_grad=True)
    model.train()
    torch.manual_seed(5)
    out = model(x)
    out.sum().backward()

    # Direct: the seeds are the next draws of the global generator, q's first, then k's.
    torch.manual_seed(5)
    seeds = [int(torch.randint(2**62, (1,))) for _ in range(2)]
    x2 = x.detach().clone().requires_grad_()
    parts = []
    for name, seed in zip(("q_proj", "k_proj"), seeds, strict=True):
        layer = getattr(model.base_model.model, name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        dropped = x2 * dropout_mask(x2, 0.2, seed)
        parts.append(layer.base_layer(x2) + F.linear(F.linear(dropped, a), b) * layer.scaling["default"])
    direct = parts[0] * parts[1]
    grads = torch.autograd.grad(direct.sum(), [x2, model.base_model.model.q_proj.lora_A["default"].weight])
    torch.testing.assert_close(out, direct)
    torch.testing.assert_close(x.grad, grads[0])
    torch.testing.assert_close(model.base_model.model.q_proj.lora_A["default"].weight.grad, grads[1])


def test_folding_keeps_state_dict_and_eval_output_and_saves_activation_memory():
    plain, folded = _peft(), _peft()
    recompute_lora_dropout(folded)
    assert plain.state_dict().keys() == folded.state_dict().keys()
    x = torch.randn(64, 32, requires_grad=True)
    plain.eval()
    folded.eval()
    torch.testing.assert_close(plain(x), folded(x))
    plain.train()
    folded.train()
    # Plain keeps per projection a dropped copy of x and the dropout mask; folded keeps x itself, once.
    plain_saved = [t for t in _saved(plain, x).values() if t.numel() == x.numel()]
    folded_saved = [t for t in _saved(folded, x).values() if t.numel() == x.numel()]
    assert len(plain_saved) == 4
    assert len(folded_saved) == 1 and folded_saved[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    nbytes = sum(t.untyped_storage().nbytes() for t in _saved(plain, x).values())
    assert sum(t.untyped_storage().nbytes() for t in _saved(folded, x).values()) < nbytes - x.numel() * 4


def test_gradient_checkpointing_regenerates_the_same_masks():
    model = _peft()
    recompute_lora_dropout(model)
    model.train()
    x = torch.randn(6, 32)
    lora_a = model.base_model.model.q_proj.lora_A["default"].weight
    torch.manual_seed(9)
    model(x).sum().backward()
    plain_grad = lora_a.grad.clone()
    lora_a.grad = None
    torch.manual_seed(9)
    checkpoint(model, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(lora_a.grad, plain_grad)


def test_zero_dropout_and_non_linear_adapters_are_left_alone():
    model = _peft(p=0.0)
    assert recompute_lora_dropout(model) == 0
    assert type(model.base_model.model.q_proj.lora_A["default"]) is nn.Linear


def test_disabling_dropout_on_the_model_reaches_the_folded_adapters():
    from trl.trainer import disable_dropout_in_model

    model = _peft()
    recompute_lora_dropout(model)
    disable_dropout_in_model(model)
    model.train()
    x = torch.randn(6, 32)
    torch.testing.assert_close(model(x), model(x))  # no dropout left: two calls agree
