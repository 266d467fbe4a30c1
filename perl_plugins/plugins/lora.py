"""``lora``: PERL (arXiv 2403.10704) — reward model and policy trained through LoRA adapters on one
frozen base that also serves the reference (adapters off) and the reward (a second adapter + head).

On a reward trainer the model becomes a LoRA sequence-classification model whose ``score`` head is
saved with the adapter. On DPO/KTO/GRPO/RLOO the policy becomes a LoRA adapter and the separate
reference copy is dropped: trl then computes reference log-probs with adapters disabled. A
:class:`AdapterReward` reward function scores completions with a reward adapter loaded onto the
policy's own base, so RL holds one copy of the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from perl_plugins import hookimpl
from perl_plugins.host.attach import trainer_family
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.lazy import lazy_import
from perl_plugins.models.reward import check_reward_adapter, load_reward_adapter, score_texts
from perl_plugins.models.roles import Roles

# Imported when a hook first runs: listing this plugin's options needs no torch.
nn = lazy_import("torch.nn")

_RL = {"GRPOTrainer", "RLOOTrainer"}
_HAS_REFERENCE = {"DPOTrainer", "KTOTrainer", *_RL}
ROLE_NAMES = ("policy", "reference", "reward")


@dataclass
class LoraOptions:
    # rank/alpha/dropout/targets share trl ModelConfig's flag names and meaning (--lora_r ...).
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (PERL's ranks are unverified; GRM used 32)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (effective scale alpha / r)."})
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout on the LoRA input; 0 where the trainer disables dropout (trl's disable_dropout)."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt; default: every linear projection inside the attention blocks "
            "(q/k/v/o on Llama)."
        },
    )
    lora_roles: str = field(
        default="policy,reference,reward",
        metadata={
            "help": "Roles kept on the shared base: 'policy' (the trained adapter), 'reference' (adapters off, "
            "replacing a reference copy), 'reward' (AdapterReward reward functions on the policy's base)."
        },
    )

    def __post_init__(self) -> None:
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ValueError(f"lora_r and lora_alpha must be >= 1, got {self.lora_r} and {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        unknown = set(self.role_list) - set(ROLE_NAMES)
        if unknown or "policy" not in self.role_list:
            raise ValueError(f"lora_roles must include 'policy' and only name {ROLE_NAMES}, got {self.lora_roles!r}.")

    @property
    def role_list(self) -> list[str]:
        return [r.strip() for r in self.lora_roles.split(",") if r.strip()]


def attention_projections(model: nn.Module) -> list[str]:
    """Names of the linear layers inside attention blocks (what PERL adapts by default)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(part in name for part in ("attn", "attention"))
    }
    if not names:
        raise PluginIncompatibleError(
            f"lora: found no linear layers inside attention blocks of {type(model).__name__}; "
            "set lora_target_modules explicitly."
        )
    return sorted(names)


def lora_config(model: nn.Module, options: LoraOptions) -> Any:
    """The ``peft.LoraConfig`` this plugin applies to ``model`` (also used by the CLI and recipes)."""
    from peft import LoraConfig, TaskType

    targets = options.lora_target_modules or attention_projections(model)
    is_classifier = model.__class__.__name__.endswith("ForSequenceClassification")
    return LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_CLS if is_classifier else TaskType.CAUSAL_LM,
    )


class AdapterReward:
    """A GRPO/RLOO reward function scored by a LoRA reward adapter on the policy's own base.

    Pass it in ``reward_funcs`` and attach ``lora``: the plugin loads the adapter (and its head)
    onto the policy model as role ``reward``. Each call switches to that adapter under no_grad
    and in eval mode, scores prompt + completion, and switches back.
    """

    def __init__(self, path: str, batch_size: int = 16, max_length: int | None = None) -> None:
        self.path = str(path)
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = "reward_adapter"  # trl names logged reward columns after the function
        self.roles: Roles | None = None
        self.tokenizer: Any = None

    def bind(self, roles: Roles, tokenizer: Any) -> None:
        self.roles, self.tokenizer = roles, tokenizer

    @property
    def perl_requires_plugin(self) -> str | None:
        """The plugin ``attach()`` must enable for this reward to work: ``lora`` binds it (None once bound)."""
        return "lora" if self.roles is None else None

    def texts(self, prompts: list[Any], completions: list[Any]) -> list[str | list[dict[str, Any]]]:
        """Prompt + completion: one text, or one conversation (encoded through the chat template
        exactly as reward training encoded conversations)."""
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        if self.roles is None:
            raise RuntimeError("AdapterReward is not bound to a model: attach the 'lora' plugin to the trainer.")
        model = self.roles.model
        was_training = model.training
        model.eval()
        try:
            with self.roles.use("reward"):
                rewards = score_texts(
                    model, self.tokenizer, self.texts(prompts, completions), self.batch_size, self.max_length
                )
        finally:
            model.train(was_training)
        return rewards.tolist()


def roles(trainer: Any) -> Roles:
    """The :class:`Roles` the ``lora`` plugin set up on ``trainer`` (``with roles(t).use("reward")``)."""
    found = getattr(trainer, "perl_roles", None)
    if found is None:
        raise PluginIncompatibleError("This trainer has no roles: attach the 'lora' plugin first.")
    return found


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
        raise PluginIncompatibleError(f"lora: the trainer's model ({type(model).__name__}) is not a transformers model.")
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
    adapters: dict[str, str | None] = {"policy": peft_model.active_adapter}
    if family in _HAS_REFERENCE and "reference" in opts.role_list:
        trainer.ref_model = None  # trl falls back to the same model with adapters disabled
        adapters["reference"] = None
    rewards = _adapter_rewards(trainer)
    if rewards:
        load_reward_adapter(peft_model, rewards[0].path, adapter_name="reward")
        adapters["reward"] = "reward"
    trainer.perl_roles = Roles(peft_model, adapters)
    for reward in rewards:
        reward.bind(trainer.perl_roles, trainer.processing_class)
    return peft_model
