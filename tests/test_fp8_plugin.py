"""The ``fp8`` plugin on every trainer type, and its loud refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import TRAINER_KINDS, train_quietly

from perl_plugins import PluginIncompatibleError
from perl_plugins import PluginOptionError
from perl_plugins import attach
from perl_plugins.plugins.fp8 import FP8AdamW


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


@pytest.mark.parametrize("kind", TRAINER_KINDS)
def test_every_trainer_trains_with_fp8adamw_over_adapters_only(kind, make_trainer):
    trainer = make_trainer(kind, lora=True, max_steps=2, weight_decay=0.05, adam_beta2=0.98)
    attach(trainer, plugins="fp8", fp8_compile=False, fp8_min_numel=0)
    logs = train_quietly(trainer)
    optimizer = _inner(trainer.optimizer)
    assert isinstance(optimizer, FP8AdamW)
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == trainable  # with LoRA: the adapters (and heads), never the frozen base
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["lr"] == trainer.args.learning_rate
    assert {g["weight_decay"] for g in optimizer.param_groups} <= {0.05, 0.0}
    assert any(s["exp_avg"].dtype == torch.float8_e4m3fn for s in optimizer.state.values())
    assert all("fp8/nonfinite_skips" in log for log in logs)


def test_another_optimizer_is_refused(make_trainer):
    trainer = make_trainer("trainer", optim="adafactor")
    with pytest.raises(PluginIncompatibleError, match="--optim adafactor"):
        attach(trainer, plugins="fp8")
    trainer = make_trainer("trainer")
    trainer.optimizer_cls_and_kwargs = (torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(PluginIncompatibleError, match="own optimizer"):
        attach(trainer, plugins="fp8")
    assert not hasattr(trainer, "perl_plugins")


def test_fp8_comm_needs_multi_process_ddp(make_trainer):
    with pytest.raises(PluginIncompatibleError, match="multi-process"):
        attach(make_trainer("trainer"), plugins="fp8", fp8_comm=True)


def test_bad_fp8_options(make_trainer):
    with pytest.raises(PluginOptionError, match="fp8_second_moment"):
        attach(make_trainer("trainer"), plugins="fp8", fp8_second_moment="fp4")


def test_deepspeed_configs_fp8adamw_cannot_serve_are_refused(make_trainer):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    trainer = make_trainer("trainer")
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    trainer.args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(offload)
    with pytest.raises(PluginIncompatibleError, match="ZeRO-Offload"):
        attach(trainer, plugins="fp8")
    own = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}
    trainer.args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(own)
    with pytest.raises(PluginIncompatibleError, match="'optimizer' section"):
        attach(trainer, plugins="fp8")
    assert not hasattr(trainer, "perl_plugins")
