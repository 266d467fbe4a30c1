"""``lora``: PERL (arXiv 2403.10704) — reward model and policy trained through LoRA adapters on one
frozen base that also serves the reference (adapters off) and the reward (a second adapter + head).

On a reward trainer the model becomes a LoRA sequence-classification model whose ``score`` head is
saved with the adapter. On DPO/KTO/GRPO/RLOO the policy becomes a LoRA adapter and the separate
reference copy is dropped: trl then computes reference log-probs with adapters disabled. A
:class:`AdapterReward` reward function scores completions with a reward adapter loaded onto the
policy's own base, so RL holds one copy of the base weights.
"""

from __future__ import annotations

from typing import Any

import perl_plugins
from perl_plugins import hookimpl, trainer_family
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.models.adapters import AdapterReward, LoraOptions, attention_projections, lora_config
from perl_plugins.models.reward import check_reward_adapter, load_reward_adapter
from perl_plugins.models.roles import Roles, roles

__all__ = ["AdapterReward", "LoraOptions", "lora_config", "roles"]  # this plugin's public names, for recipes


_RL = {"GRPOTrainer", "RLOOTrainer"}
_HAS_REFERENCE = {"DPOTrainer", "KTOTrainer", *_RL}


def _adapter_rewards(trainer: Any) -> list[AdapterReward]:
    return [f for f in getattr(trainer, "reward_funcs", None) or [] if isinstance(f, AdapterReward)]


@hookimpl
def perl_plugin_options() -> type:
    return LoraOptions


@hookimpl
def perl_check_trainer(trainer: Any, options: dict[str, Any]) -> None:
    opts: LoraOptions = options["lora"]
    model = trainer.model
    if not hasattr(model, "config"):
        raise PluginIncompatibleError(
            f"lora: the trainer's model ({type(model).__name__}) is not a transformers model."
        )
    rewards = _adapter_rewards(trainer)
    if rewards and "reward" not in opts.role_list:
        raise PluginIncompatibleError("lora: AdapterReward reward functions need the 'reward' role in lora_roles.")
    if len({reward.path for reward in rewards}) > 1:
        raise PluginIncompatibleError("lora: all AdapterReward functions must use the same reward adapter.")
    for reward in rewards:  # refuse a reward adapter from another base before anything changes
        check_reward_adapter(model, reward.path)
    if not opts.lora_target_modules and not hasattr(model, "peft_config"):
        attention_projections(model)


@hookimpl
def perl_prepare_model(trainer: Any, model: Any, role: str, options: dict[str, Any]) -> Any:
    if role != "policy":
        return None
    from peft import PeftModel, get_peft_model

    opts: LoraOptions = options["lora"]
    family = trainer_family(trainer)
    # A user-supplied peft model (trainer built with peft_config) wins over this plugin's config.
    peft_model = model if isinstance(model, PeftModel) else get_peft_model(model, lora_config(model, opts))
    if opts.lora_dropout_recompute:
        from perl_plugins.models.lora_dropout import recompute_lora_dropout

        recompute_lora_dropout(peft_model)
    adapters: dict[str, str | None] = {"policy": peft_model.active_adapter}
    if family in _HAS_REFERENCE and "reference" in opts.role_list:
        trainer.ref_model = None  # trl falls back to the same model with adapters disabled
        adapters["reference"] = None
    rewards = _adapter_rewards(trainer)
    if rewards:
        load_reward_adapter(peft_model, rewards[0].path, adapter_name="reward")
        adapters["reward"] = "reward"
    role_set = perl_plugins.state(trainer)["lora"] = Roles(peft_model, adapters)
    for reward in rewards:
        reward.bind(role_set, trainer.processing_class)
    return peft_model
