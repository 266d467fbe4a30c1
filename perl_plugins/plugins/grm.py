"""``grm``: GRM (arXiv 2406.10216) — the reward model keeps its LM head, and a text-generation
regularizer on the same final hidden states makes it generalize.

Works on stock ``RewardTrainer`` (pairs) and on a stock ``Trainer`` training a one-label
classifier on thumbs up/down rows (pointwise; see :mod:`perl_plugins.training.pointwise`). The stock loss
stays the reward loss; this plugin re-weights it by ``1 - alpha`` and adds ``alpha * L_reg``:

- ``sft``:       L_reg = -mean log sigmoid(beta * logp(y_c))
- ``dpo``:       L_reg = -mean log sigmoid(beta * ((logp_c - logp_r) - (ref_c - ref_r)))
- ``dpo_noref``: the same with the reference terms 0

logp is the SUM of the log-probabilities of the response tokens, read off the LM head on the
hidden states of the reward forward pass (captured with a forward hook: no second pass). The
response starts where the ``prompt`` column's tokens end (capped at the tokens chosen and rejected
share; without a prompt column, at the shared tokens). On pointwise rows ``sft`` is the mean over
*all* rows of the per-row term, 0 on thumbs-down rows: a per-row mean like the stock BCE, so
gradient accumulation adds micro-batches up to the same loss. With LoRA the reference is the same
model with adapters disabled; without, a frozen copy.

Dropout: the MLP head's Dropout(0.1) follows the trainer's ``disable_dropout`` (trl's reward trainer
defaults to True and disables the base's dropout before plugins add modules; the host then sets
the added ones to 0 as well), so chosen and rejected rows of a pair see no independent masks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from perl_plugins import hookimpl, keep_columns, trainer_family
from perl_plugins import state as plugin_state
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.lazy import lazy_import
from perl_plugins.models.logprobs import response_logps
from perl_plugins.models.reward import HEAD_ATTR, HEAD_KINDS, decoder, set_reward_head, unwrap

# Imported when a hook or loss first runs: listing this plugin's options needs no torch.
torch = lazy_import("torch")
nn = lazy_import("torch.nn")
F = lazy_import("torch.nn.functional")
trl_data_utils = lazy_import("trl.data_utils")

REGULARIZERS = ("sft", "dpo", "dpo_noref")


@dataclass
class GRMOptions:
    grm_reg: str = field(default="sft", metadata={"help": f"Text-generation regularizer: one of {REGULARIZERS}."})
    grm_alpha: float = field(
        default=0.01, metadata={"help": "Weight of the regularizer: L = (1 - alpha) * L_reward + alpha * L_reg."}
    )
    grm_beta: float = field(default=0.1, metadata={"help": "Inverse temperature inside the regularizer's sigmoid."})
    grm_head: str = field(
        default="mlp",
        metadata={
            "help": "Reward head: 'mlp' (GRM's Dropout 0.1 -> Linear(hidden, 1024) -> ReLU -> Linear(1024, 1), "
            "freshly initialised) or 'linear' (keeps the model's own linear score head)."
        },
    )

    def __post_init__(self) -> None:
        if self.grm_reg not in REGULARIZERS:
            raise ValueError(f"grm_reg must be one of {REGULARIZERS}, got {self.grm_reg!r}.")
        if not 0.0 <= self.grm_alpha <= 1.0:
            raise ValueError(f"grm_alpha must be in [0, 1], got {self.grm_alpha}.")
        if self.grm_head not in HEAD_KINDS:
            raise ValueError(f"grm_head must be one of {HEAD_KINDS}, got {self.grm_head!r}.")


def grm_regularizer(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor | None = None,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    reg: str = "sft",
    beta: float = 0.1,
) -> torch.Tensor:
    """L_reg of GRM (scalar) from summed response log-probs."""
    if reg == "sft":
        return -F.logsigmoid(beta * logp_chosen).mean()
    if logp_rejected is None:
        raise ValueError(f"grm_reg={reg!r} needs rejected responses (preference pairs).")
    margin = logp_chosen - logp_rejected
    if reg == "dpo":
        if ref_chosen is None or ref_rejected is None:
            raise ValueError("grm_reg='dpo' needs reference log-probs (ref_chosen, ref_rejected).")
        margin = margin - (ref_chosen - ref_rejected)
    elif reg != "dpo_noref":
        raise ValueError(f"Unknown GRM regularizer {reg!r}; choose one of {REGULARIZERS}.")
    return -F.logsigmoid(beta * margin).mean()


def grm_loss(
    reward_chosen: torch.Tensor,
    reward_rejected: torch.Tensor,
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    reg: str = "sft",
    alpha: float = 0.01,
    beta: float = 0.1,
) -> torch.Tensor:
    """GRM's total pairwise loss: ``(1 - alpha) * -mean log sigmoid(r_c - r_r) + alpha * L_reg``."""
    reward_loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()
    regularizer = grm_regularizer(logp_chosen, logp_rejected, ref_chosen, ref_rejected, reg=reg, beta=beta)
    return (1 - alpha) * reward_loss + alpha * regularizer


def find_lm_head(model: nn.Module) -> nn.Module:
    """The LM head of a causal LM, or the one of the checkpoint a classification model came from."""
    base = unwrap(model)
    if hasattr(base, "lm_head"):
        return base.lm_head
    embeddings = base.get_input_embeddings()
    config = base.config.get_text_config()
    head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    if getattr(base.config, "tie_word_embeddings", False):
        head.weight = embeddings.weight
        return head
    weight = _checkpoint_tensor(base.config.name_or_path or "", "lm_head.weight")
    if weight is None:
        raise PluginIncompatibleError(
            f"grm: {type(base).__name__} has no LM head, its embeddings are not tied, and its checkpoint "
            f"{base.config.name_or_path or '(none: built in memory)'!r} holds no 'lm_head.weight'. "
            "Load the reward model from a causal-LM checkpoint (AutoModelForSequenceClassification.from_pretrained "
            "on it), or give the trainer a model that has an lm_head."
        )
    head.weight = nn.Parameter(weight.to(device=embeddings.weight.device, dtype=embeddings.weight.dtype))
    return head


def _checkpoint_tensor(name_or_path: str, tensor_name: str) -> torch.Tensor | None:
    """Read one tensor from a local or hub checkpoint's safetensors without loading the rest."""
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    if not name_or_path:
        return None

    def resolve(filename: str) -> str | None:
        try:
            return cached_file(name_or_path, filename)
        except OSError:  # no such file or checkpoint, or the hub is out of reach
            return None

    index = resolve("model.safetensors.index.json")
    if index is not None:
        shard = json.load(open(index))["weight_map"].get(tensor_name)
        filename = resolve(shard) if shard else None
    else:
        filename = resolve("model.safetensors")
    if filename is None:
        return None
    with safe_open(filename, framework="pt") as f:
        return f.get_tensor(tensor_name) if tensor_name in f.keys() else None


class _CompletionMaskCollator:
    """Wraps the trainer's collator: turns each row's ``prompt_len`` into a ``completion_mask``
    aligned with the batch (pairwise batches are chosen rows then rejected rows)."""

    def __init__(self, inner: Any, pairwise: bool) -> None:
        self.inner = inner
        self.pairwise = pairwise

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [example["prompt_len"] for example in examples]
        batch = self.inner([{k: v for k, v in ex.items() if k != "prompt_len"} for ex in examples])
        starts = torch.tensor(lengths * (2 if self.pairwise else 1))
        positions = torch.arange(batch["input_ids"].shape[1])
        batch["completion_mask"] = (positions[None, :] >= starts[:, None]) & batch["attention_mask"].bool()
        return batch


def _prompt_ids(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> list[int]:
    """The prompt as trl tokenizes text: plain text with the tokenizer's special tokens (as
    RewardTrainer encodes prompt + response), a conversation through its chat template up to the
    generation prompt."""
    if isinstance(prompt, str):
        return tokenizer(text=prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]


def _pair_prompt_length(example: dict[str, Any], tokenizer: Any) -> dict[str, int]:
    """Where the responses start: after the prompt's own tokens, never past the tokens chosen and
    rejected share (responses often share their start, e.g. ' API call: {', which is response).
    Without a ``prompt`` column (trl's implicit-prompt pairs) the shared tokens are the prompt."""
    shared = trl_data_utils.common_prefix_length(example["chosen_ids"], example["rejected_ids"])
    if example.get("prompt") is None:
        return {"prompt_len": shared}
    # A prompt's last token may merge with the response's first: the prompt ends where the ids differ.
    prompt_len = trl_data_utils.common_prefix_length(_prompt_ids(tokenizer, example["prompt"]), example["chosen_ids"])
    return {"prompt_len": min(prompt_len, shared)}


class _GRMState:
    """Per-trainer state: the captured hidden states, the LM head, the frozen reference."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.lm_head: nn.Module | None = None
        self.reference: nn.Module | None = None

    def capture(self, module: nn.Module, args: Any, output: Any) -> None:
        self.hidden = output.last_hidden_state


def _is_pairwise(trainer: Any) -> bool:
    return trainer_family(trainer) == "RewardTrainer"


@hookimpl
def perl_plugin_options() -> type:
    return GRMOptions


@hookimpl
def perl_check_trainer(trainer: Any, options: dict[str, Any]) -> None:
    opts: GRMOptions = options["grm"]
    family = trainer_family(trainer)
    config = getattr(trainer.model, "config", None)
    if family != "RewardTrainer" and not (family == "Trainer" and getattr(config, "num_labels", None) == 1):
        raise PluginIncompatibleError(
            f"grm trains reward models: attach it to RewardTrainer (pairs) or to a Trainer of a one-label "
            f"classifier on thumbs up/down rows, not to {type(trainer).__name__}."
        )
    if not _is_pairwise(trainer) and opts.grm_reg != "sft":
        raise PluginIncompatibleError(
            f"grm_reg={opts.grm_reg!r} needs preference pairs (chosen/rejected), but this trainer has pointwise "
            "thumbs up/down rows; use grm_reg='sft' (it regularizes on thumbs-up completions) or pair the data."
        )
    if not _is_pairwise(trainer) and "prompt_len" not in (trainer.train_dataset.column_names or []):
        raise PluginIncompatibleError(
            "grm: pointwise rows need a 'prompt_len' column to mask prompts (perl_plugins.training.pointwise.tokenize_pointwise adds it)."
        )
    if opts.grm_head == "mlp" and hasattr(trainer.model, "peft_config"):
        raise PluginIncompatibleError(
            "grm_head='mlp' must be created before LoRA wraps the model (peft would not save it with the "
            "adapter): build the trainer without peft_config and add the 'lora' plugin, or use grm_head='linear'."
        )
    find_lm_head(trainer.model)  # refuse a model without any LM head before training


@hookimpl
def perl_configure(trainer: Any, options: dict[str, Any]) -> None:
    pairwise = _is_pairwise(trainer)
    if pairwise:
        lengths = {"function": _pair_prompt_length, "fn_kwargs": {"tokenizer": trainer.processing_class}}
        trainer.train_dataset = trainer.train_dataset.map(**lengths, desc="GRM prompt lengths")
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = trainer.eval_dataset.map(**lengths, desc="GRM prompt lengths")
    collator = _CompletionMaskCollator(trainer.data_collator, pairwise)
    keep_columns(trainer, ["prompt_len"], collator=collator, private=["completion_mask"])


@hookimpl(tryfirst=True)  # before lora wraps the model, so the head is saved with the adapter
def perl_prepare_model(trainer: Any, model: Any, role: str, options: dict[str, Any]) -> Any:
    if role != "policy":
        return None
    opts: GRMOptions = options["grm"]
    grm = plugin_state(trainer)["grm"] = _GRMState()
    grm.lm_head = find_lm_head(model)
    base = unwrap(model)
    if not hasattr(base, "lm_head"):
        base.lm_head = grm.lm_head  # a submodule, so it moves with the model and LoRA freezes it
    if opts.grm_head == "mlp":
        set_reward_head(base, "mlp")
    elif not hasattr(base, HEAD_ATTR):
        set_reward_head(base, "linear")
    return None


@hookimpl
def perl_models_ready(trainer: Any, model: Any, options: dict[str, Any]) -> None:
    """The dpo regularizer's reference: the model with its adapters disabled when some plugin gave
    it peft adapters, else a frozen copy of the initial model."""
    grm: _GRMState = plugin_state(trainer)["grm"]
    if options["grm"].grm_reg == "dpo" and not hasattr(model, "peft_config"):
        grm.reference = copy.deepcopy(model).eval().requires_grad_(False)
        decoder(grm.reference).register_forward_hook(grm.capture)
    decoder(model).register_forward_hook(grm.capture)


def _reference_logps(trainer: Any, inputs: dict[str, Any]) -> torch.Tensor:
    state: _GRMState = plugin_state(trainer)["grm"]
    model = trainer.model
    with torch.no_grad():
        if state.reference is not None:
            state.reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        else:  # LoRA: the base with adapters disabled is the reference; the hook captures its states
            with model.disable_adapter():
                model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        lm_head = unwrap(state.reference).lm_head if state.reference is not None else state.lm_head
        return response_logps(state.hidden, inputs["input_ids"], inputs["completion_mask"], lm_head)


@hookimpl
def perl_compute_loss(trainer: Any, inputs: dict[str, Any], outputs: Any, terms: Any, options: dict[str, Any]) -> None:
    opts: GRMOptions = options["grm"]
    state: _GRMState = plugin_state(trainer)["grm"]
    logps = response_logps(state.hidden, inputs["input_ids"], inputs["completion_mask"], state.lm_head)
    state.hidden = None  # do not keep the graph alive past this step
    if _is_pairwise(trainer):
        logp_chosen, logp_rejected = logps.chunk(2)
        ref_chosen = ref_rejected = None
        if opts.grm_reg == "dpo":
            ref_chosen, ref_rejected = _reference_logps(trainer, inputs).chunk(2)
        regularizer = grm_regularizer(
            logp_chosen, logp_rejected, ref_chosen, ref_rejected, reg=opts.grm_reg, beta=opts.grm_beta
        )
    else:  # pointwise: sft on thumbs-up completions only, 0 on thumbs-down rows
        liked = inputs["labels"].view(-1) > 0.5
        # A mean over all rows, as the BCE: micro-batches then add up to the same loss as one batch.
        regularizer = torch.where(liked, -F.logsigmoid(opts.grm_beta * logps), 0.0).mean()
    terms.reweight(terms.base_name, 1.0 - opts.grm_alpha)
    terms.add("grm_reg_loss", regularizer, opts.grm_alpha)
