"""The ``fp8`` plugin on every trainer type, and its loud refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import TRAINER_KINDS, train_quietly

from perl_plugins import PluginIncompatibleError, PluginOptionError, attach
from perl_plugins.plugins.fp8 import FP8AdamW


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


@pytest.mark.parametrize("kind", TRAINER_KINDS)
def test_every_trainer_trains_with_fp8adamw_over_adapters_only(kind, make_trainer):
    trainer = make_trainer(kind, lora=True, max_steps=2, weight_decay=0.05, adam_beta2=0.98)
    attach(trainer, plugins="fp8", fp8_kernel="cpp", fp8_min_numel=0)
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
    with pytest.raises(PluginOptionError, match="fp8_kernel"):
        attach(make_trainer("trainer"), plugins="fp8", fp8_kernel="triton")


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


def test_fp8_comm_scales_round_trip_through_the_checkpointed_optimizer_state(tmp_path):
    """fp8_comm's per-parameter scales and step counts are saved with the optimizer (optimizer.pt)
    and restored onto the resumed run's parameters: a resume that restarted them at init_scale
    quantized its next gradients differently from the uninterrupted run."""
    from types import SimpleNamespace

    from perl_plugins.plugins import fp8 as fp8_plugin
    from perl_plugins.plugins.fp8 import FP8Options

    def trainer_and_model():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        args = SimpleNamespace(
            learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0
        )
        trainer = SimpleNamespace(
            args=args,
            get_decay_parameter_names=lambda m: [n for n, _ in m.named_parameters()],
            perl_plugins=SimpleNamespace(state={}),
        )
        options = {"fp8": FP8Options(fp8_comm=True, fp8_kernel="cpp")}
        return trainer, model, fp8_plugin.perl_create_optimizer(trainer=trainer, model=model, options=options)

    trainer, model, optimizer = trainer_and_model()
    comm = trainer.perl_plugins.state["fp8"]
    params = list(model.parameters())
    for i, p in enumerate(params):
        comm.commit(id(p), 2.0 ** (10 - i))
    comm.commit(id(params[0]), 2.0**9)  # a halving
    comm.commit(id(params[1]), 2.0**9)  # a quiet step
    comm.bytes_sent, comm.bytes_fp32_equivalent = 100, 400
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    resumed, model2, optimizer2 = trainer_and_model()
    optimizer2.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    restored = resumed.perl_plugins.state["fp8"]
    by_position = [(comm.scales[id(p)], comm.good_steps[id(p)]) for p in params]
    assert [(restored.scales[id(p)], restored.good_steps[id(p)]) for p in model2.parameters()] == by_position
    assert by_position[:2] == [(2.0**9, 0), (2.0**9, 1)]
    assert (restored.halvings, restored.bytes_sent, restored.bytes_fp32_equivalent) == (comm.halvings, 100, 400)
