"""Plugins on every stock trainer type, plain and with a LoRA ``peft_config``, for a few real steps."""

from __future__ import annotations

import pytest
from conftest import MAX_STEPS, TRAINER_KINDS, step_losses, train_quietly

from perl_plugins import attach, hookimpl
from perl_plugins.host.attach import trainer_family

AUX_TERM = "aux_l2"
AUX_WEIGHT = 0.5
BASE_TERM = {
    "trainer": "base_loss",
    "sft": "sft_loss",
    "reward": "reward_loss",
    "dpo": "dpo_loss",
    "kto": "kto_loss",
    "grpo": "policy_loss",
    "rloo": "policy_loss",
}
EQUIVALENCE_STEPS = 5


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("kind", TRAINER_KINDS)
def test_loss_term_and_step_hooks(make_trainer, plugin_file, kind, lora):
    stock_first_loss = step_losses(make_trainer(kind, lora=lora, max_steps=1))[0]

    trainer = make_trainer(kind, lora=lora)
    assert attach(trainer, plugins=[plugin_file("aux_loss")], aux_loss_weight=AUX_WEIGHT) is trainer
    if lora:
        from peft import PeftModel

        assert isinstance(trainer.model, PeftModel)
    logs = train_quietly(trainer)

    base = BASE_TERM[kind]
    assert len(logs) == MAX_STEPS
    for entry in logs:
        # Each term is logged under its own name, and the optimized loss is their weighted sum.
        assert entry[AUX_TERM] > 0
        assert entry["loss"] == pytest.approx(entry[base] + AUX_WEIGHT * entry[AUX_TERM], rel=1e-5, abs=1e-7)
    # Before the first update the stock term is exactly what the stock trainer computes; the
    # weighted plugin term changes the loss.
    assert logs[0][base] == pytest.approx(stock_first_loss, rel=1e-6, abs=1e-7)
    assert logs[0]["loss"] != pytest.approx(stock_first_loss, rel=1e-6, abs=1e-7)

    assert trainer.aux_loss_events["train_begin"] == 1
    assert trainer.aux_loss_events["step_end"] == MAX_STEPS
    assert trainer.aux_loss_events["log"] == MAX_STEPS + 1  # one per step, plus the end-of-training summary
    step_log_keys = [keys for keys in trainer.aux_loss_logged_keys if "loss" in keys]
    assert len(step_log_keys) == MAX_STEPS
    assert all(AUX_TERM in keys and base in keys for keys in step_log_keys)  # terms are added before on_log


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_shape_rewards(make_trainer, plugin_file, kind):
    stock = make_trainer(kind)
    stock_rewards = [entry["reward"] for entry in train_quietly(stock)]

    trainer = make_trainer(kind)
    attach(trainer, plugins=plugin_file("reward_shift"), reward_shift_value=100.0)
    shaped_rewards = [entry["reward"] for entry in train_quietly(trainer)]

    # Called once per generation round with (num_completions, num_reward_funcs) rewards.
    assert trainer.reward_shift_shapes and all(shape == (2, 1) for shape in trainer.reward_shift_shapes)
    assert shaped_rewards[0] == pytest.approx(stock_rewards[0] + 100.0)  # same first generation, shifted
    assert min(shaped_rewards) >= 100.0


class _Doubler:
    """A plugin object that doubles rewards: given after ``reward_shift``, it must see shifted rewards."""

    PLUGIN_NAME = "doubler"

    @hookimpl
    def perl_shape_rewards(self, rewards):
        return rewards * 2


def test_shape_rewards_chain_in_plugin_order(make_trainer, plugin_file):
    stock_reward = train_quietly(make_trainer("grpo", max_steps=1))[0]["reward"]
    trainer = make_trainer("grpo", max_steps=1)
    attach(trainer, plugins=[plugin_file("reward_shift"), _Doubler()], reward_shift_value=100.0)
    assert train_quietly(trainer)[0]["reward"] == pytest.approx((stock_reward + 100.0) * 2)


# ---------------------------------------------------------------- no-plugin equivalence


def _stock_losses(make_trainer, kind):
    return step_losses(make_trainer(kind, max_steps=EQUIVALENCE_STEPS))


def _attached_losses(make_trainer, kind, plugins):
    trainer = make_trainer(kind, max_steps=EQUIVALENCE_STEPS)
    attach(trainer, plugins=plugins)
    return trainer, step_losses(trainer)


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_no_plugins_and_options_only_are_bitwise_stock(make_trainer, plugin_file, kind):
    stock = _stock_losses(make_trainer, kind)
    assert len(stock) == EQUIVALENCE_STEPS

    trainer, losses = _attached_losses(make_trainer, kind, [])
    assert losses == stock
    assert not hasattr(trainer, "perl_plugins") and "compute_loss" not in vars(trainer)

    trainer, losses = _attached_losses(make_trainer, kind, [plugin_file("options_only")])
    assert losses == stock
    assert trainer.perl_plugins.names == ["options_only"]
    assert trainer.perl_plugins.options["options_only"].options_only_level == 1
    wrapped = {"compute_loss", "log", "create_optimizer", "_save_checkpoint", "_load_from_checkpoint"}
    assert not wrapped & set(vars(trainer))  # nothing wrapped


@pytest.mark.parametrize("kind", ["trainer", "sft", "reward", "dpo", "grpo"])
def test_observing_plugin_is_bitwise_stock(make_trainer, plugin_file, kind):
    stock = _stock_losses(make_trainer, kind)
    trainer, losses = _attached_losses(make_trainer, kind, [plugin_file("observer")])
    assert "compute_loss" in vars(trainer)  # really wrapped
    assert losses == stock
    assert len(trainer.observed_losses) == EQUIVALENCE_STEPS


def test_trainer_family_of_every_kind(make_trainer):
    families = {kind: trainer_family(make_trainer(kind, max_steps=1)) for kind in TRAINER_KINDS}
    assert families == {
        "trainer": "Trainer",
        "sft": "SFTTrainer",
        "reward": "RewardTrainer",
        "dpo": "DPOTrainer",
        "kto": "KTOTrainer",
        "grpo": "GRPOTrainer",
        "rloo": "RLOOTrainer",
    }


def test_outputs_are_passed_to_loss_plugins(make_trainer):
    seen = []

    class Peek:
        PLUGIN_NAME = "peek"

        @hookimpl
        def perl_compute_loss(self, inputs, outputs, terms):
            seen.append((outputs.logits.shape[0], inputs["input_ids"].shape[0], terms.base_name))

    trainer = make_trainer("reward", max_steps=1)
    attach(trainer, plugins=[Peek()])
    train_quietly(trainer)
    # The reward trainer scores chosen and rejected in one batch.
    assert seen == [(4, 4, "reward_loss")]


def _count_forwards(trainer) -> list[int]:
    calls = [0]
    trainer.model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_outputs_requested_only_when_a_plugin_takes_them(make_trainer, plugin_file):
    # trl's SFTTrainer recomputes the logits with an extra forward pass for return_outputs=True.
    stock = make_trainer("sft", max_steps=1)
    stock_calls = _count_forwards(stock)
    train_quietly(stock)

    observed = make_trainer("sft", max_steps=1)
    attach(observed, plugins=plugin_file("observer"))  # its perl_compute_loss does not take outputs
    observed_calls = _count_forwards(observed)
    train_quietly(observed)
    assert observed_calls == stock_calls

    seen = []

    class Peek:
        PLUGIN_NAME = "peek"

        @hookimpl
        def perl_compute_loss(self, outputs):
            seen.append(outputs.logits.shape[:2])

    peeked = make_trainer("sft", max_steps=1)
    attach(peeked, plugins=[Peek()])
    peeked_calls = _count_forwards(peeked)
    train_quietly(peeked)
    assert peeked_calls[0] == stock_calls[0] + 1 and len(seen) == 1
