"""LoRA on a shared base (PERL, arXiv 2403.10704): the settings, the ``peft`` config they make, and
:class:`AdapterReward`, a reward function scored by a reward adapter on the policy's own base.
The ``lora`` plugin applies them to trainers; the CLI and recipes use them directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.lazy import lazy_import
from perl_plugins.models.reward import score_texts
from perl_plugins.models.roles import Roles

nn = lazy_import("torch.nn")

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
    lora_dropout_recompute: bool = field(
        default=True,
        metadata={
            "help": "Regenerate the LoRA dropout mask in backward from a seed instead of keeping a dropped copy "
            "of each adapter's input for it (same distribution, less activation memory)."
        },
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
