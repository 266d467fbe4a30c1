"""Reward models that keep their causal LM: a reward head named ``score`` on the final hidden state.

The head is called ``score``, as in transformers' ``*ForSequenceClassification`` models, and the
backbone keeps its name too, so a LoRA reward adapter trained on a stock sequence-classification
model (its head saved through peft's ``modules_to_save``) loads unchanged onto the causal LM the
policy uses: one base, several roles.

Train and score read the reward at the same token. Texts become ids as trl's RewardTrainer makes
them (:func:`reward_ids`: plain text + EOS with the tokenizer's special tokens, a BOS where it adds
one; a conversation through its chat template), and the head output is pooled at the last token
that is not the *training* pad id (transformers' rule). trl sets that pad id on the reward model's
config, which a policy's base does not share (Llama-3 and Mistral have none), so a reward adapter
records it, with the text rule, in ``perl_reward_head.json`` (:class:`RewardEncoding`); without a
record the last attended token is read, never the last position of a padded row.

Pointwise (thumbs up/down) reward models append no EOS: their reward is read at the completion's
last token, as it is for every base whose pad is its EOS (SmolLM2, Qwen). Where pad and EOS differ
(the embedded base) an appended EOS would move the read to a token that is the same in every row,
and on coffee validation rows that costs AUC (see ``benchmarks/quality.py``). The model's config
records the choice (:data:`APPEND_EOS_KEY`), so a full fine-tuned model is scored as it trained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from perl_plugins.lazy import lazy_import
from perl_plugins.models.gather import gathered

# Imported on first use: the grm and lora plugins import this module while plugins are only listed.
torch = lazy_import("torch")
nn = lazy_import("torch.nn")

HEAD_ATTR = "score"
HEAD_SPEC_FILE = "perl_reward_head.json"
HEAD_KINDS = ("linear", "mlp")
MLP_WIDTH = 1024  # GRM's reference MLP head: Dropout 0.1 -> Linear(hidden, 1024) -> ReLU -> Linear(1024, 1)


class RewardAdapterError(ValueError):
    """A reward adapter that does not fit the base model it is loaded onto."""


def make_reward_head(hidden_size: int, kind: str = "linear") -> nn.Module:
    """A fresh reward head: ``linear`` (hidden -> 1, no bias, as transformers) or GRM's ``mlp``."""
    if kind == "linear":
        return nn.Linear(hidden_size, 1, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden_size, MLP_WIDTH), nn.ReLU(), nn.Linear(MLP_WIDTH, 1))
    raise ValueError(f"Unknown reward head {kind!r}; choose one of {HEAD_KINDS}.")


def head_kind(head: nn.Module) -> str:
    """``"mlp"`` or ``"linear"`` for a head made by :func:`make_reward_head` (peft wrappers unwrapped)."""
    head = getattr(head, "original_module", head)
    return "mlp" if isinstance(head, nn.Sequential) else "linear"


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_size(model: nn.Module) -> int:
    return unwrap(model).config.get_text_config().hidden_size


def set_reward_head(model: nn.Module, kind: str = "linear") -> nn.Module:
    """Give ``model`` (a causal LM or a sequence-classification model) a fresh ``score`` head of
    ``kind``, matching the base's dtype and device; returns the head."""
    base = unwrap(model)
    reference = base.get_input_embeddings().weight
    head = make_reward_head(hidden_size(base), kind).to(device=reference.device, dtype=reference.dtype)
    setattr(base, HEAD_ATTR, head)
    return head


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings + blocks, no head) of a causal-LM or classification model."""
    base = unwrap(model)
    return getattr(base, base.base_model_prefix)


@dataclass(frozen=True)
class RewardEncoding:
    """How reward training turned texts into ids and where it read the reward.

    ``pad_token_id``: the pad id of training: the reward is read at the last token that is not it
    (transformers' rule; with pad = EOS that is the token before the appended EOS); ``None``: at
    the last attended token. ``add_special_tokens``: plain texts were tokenized with the tokenizer's
    special tokens (trl's RewardTrainer does). ``append_eos``: EOS was appended to plain texts.
    """

    pad_token_id: int | None
    add_special_tokens: bool = True
    append_eos: bool = True


# Set by load_reward_adapter on the peft model: adapter name -> the encoding it was trained with.
_ENCODINGS_ATTR = "perl_reward_encodings"
# Set on a reward model's config by the trainer that tokenizes its texts (absent: EOS appended).
APPEND_EOS_KEY = "perl_reward_append_eos"


def reward_encoding(model: nn.Module) -> RewardEncoding:
    """The encoding of ``model``'s active reward: the one recorded with a loaded reward adapter,
    else the model's own config (a reward model in training: trl set its pad id)."""
    recorded = getattr(model, _ENCODINGS_ATTR, {}).get(getattr(model, "active_adapter", None))
    if recorded is not None:
        return recorded
    config = unwrap(model).config
    return RewardEncoding(
        pad_token_id=config.get_text_config().pad_token_id, append_eos=getattr(config, APPEND_EOS_KEY, True)
    )


def reward_ids(
    tokenizer: Any,
    example: str | list[dict[str, Any]],
    max_length: int | None = None,
    encoding: RewardEncoding | None = None,
) -> list[int]:
    """The ids a reward model trains and is scored on, made as trl's RewardTrainer makes them: a
    conversation (list of messages) through the chat template, nothing appended; plain text with
    EOS appended (unless it ends with one or ``encoding`` says not to) and the tokenizer's special
    tokens. Past ``max_length`` the oldest tokens are cut: the reward reads the last ones."""
    encoding = encoding or RewardEncoding(pad_token_id=None)
    if isinstance(example, str):
        eos = tokenizer.eos_token or ""
        if encoding.append_eos and not example.endswith(eos):
            example = example + eos
        ids = tokenizer(text=example, add_special_tokens=encoding.add_special_tokens)["input_ids"]
    else:
        ids = tokenizer.apply_chat_template(example, tokenize=True, return_dict=True)["input_ids"]
    return ids[-max_length:] if max_length is not None and len(ids) > max_length else list(ids)


def pool_last_token(
    values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None
) -> torch.Tensor:
    """``values[b, t]`` at the rightmost token of each row that is not ``pad_token_id`` (transformers'
    rule, so the same ids give the same reward here and in a classification model), or, without a
    pad id, at the rightmost attended token."""
    batch = torch.arange(input_ids.shape[0], device=values.device)
    keep = attention_mask if pad_token_id is None else input_ids != pad_token_id
    positions = torch.arange(input_ids.shape[-1], device=values.device, dtype=torch.int32)
    return values[batch, (positions * keep.to(values.device, torch.int32)).argmax(-1)]


def score(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoding: RewardEncoding | None = None
) -> torch.Tensor:
    """Rewards, shape ``(batch,)``, from the active adapter's view of ``model`` and its ``score``
    head, pooled as ``encoding`` says (default: :func:`reward_encoding`)."""
    base = unwrap(model)
    encoding = encoding or reward_encoding(model)
    hidden = decoder(base)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    values = getattr(base, HEAD_ATTR)(hidden).squeeze(-1)
    return pool_last_token(values, input_ids, attention_mask, encoding.pad_token_id)


def base_description(model: nn.Module) -> dict[str, Any]:
    """What a reward adapter records about its base, to refuse loading onto another one."""
    from perl_plugins.models.fingerprint import base_fingerprint

    base = unwrap(model)
    config = base.config.get_text_config()
    body = base.base_model_prefix + "."  # only the shared backbone: heads differ between roles
    return {
        "model_type": config.model_type,
        "name_or_path": base.config.name_or_path or "",
        "hidden_size": config.hidden_size,
        "fingerprint": base_fingerprint(model, exclude=lambda name: not name.startswith(body))["id"],
    }


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", *, write: bool = True) -> Path:
    """Save one peft adapter (with its ``modules_to_save``) as a flat peft adapter directory. Under
    DeepSpeed ZeRO-3 every process calls it (the adapter's shards are gathered) and only those with
    ``write`` write files."""
    path = Path(path)
    own = [p for n, p in model.named_parameters() if adapter_name in n.split(".")]
    with gathered(own):
        if write:
            model.save_pretrained(str(path), selected_adapters=[adapter_name])
    # peft nests non-default adapters in a sub-folder; keep one flat directory per adapter.
    nested = path / adapter_name
    if write and adapter_name != "default" and nested.is_dir():
        for item in nested.iterdir():
            item.replace(path / item.name)
        nested.rmdir()
    return path


def reward_head_spec(model: nn.Module, adapter_name: str | None = None) -> dict[str, Any] | None:
    """What a reward adapter's ``perl_reward_head.json`` must record for it to be scored as it was
    trained (head kind and :class:`RewardEncoding`) for adapter ``adapter_name`` (default: the
    active one); None when that adapter is no reward adapter or the model has no reward head."""
    head = getattr(unwrap(model), HEAD_ATTR, None)
    peft_config = getattr(model, "peft_config", {})
    name = adapter_name or getattr(model, "active_adapter", None)
    if head is None or (name in peft_config and peft_config[name].task_type != "SEQ_CLS"):
        return None
    recorded = getattr(model, _ENCODINGS_ATTR, {}).get(name)
    return {"head": head_kind(head), "encoding": asdict(recorded or reward_encoding(model))}


def save_reward_adapter(
    model: nn.Module, path: str | Path, adapter_name: str = "default", *, write: bool = True
) -> Path:
    """:func:`save_adapter` plus a head spec recording the head kind, the base it was trained on (a
    fingerprint: under ZeRO-3 every process calls this) and its :class:`RewardEncoding` (the pad id
    is the trained model's, which trl set from the tokenizer)."""
    spec = {**reward_head_spec(model), "base": base_description(model)}
    path = save_adapter(model, path, adapter_name, write=write)
    if write:
        (path / HEAD_SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return path


def _adapter_head_kind(path: Path) -> str:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys() if f".{HEAD_ATTR}." in k]
    if not keys:
        raise RewardAdapterError(f"{path} holds no reward head ({HEAD_ATTR!r} weights): not a reward adapter.")
    return "mlp" if any(f".{HEAD_ATTR}.3." in k for k in keys) else "linear"


def check_reward_adapter(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Refuse a reward adapter made on another base: fingerprint (when recorded) and tensor shapes."""
    path = Path(path)
    if not (path / "adapter_model.safetensors").is_file():
        raise RewardAdapterError(f"{path} is not a reward adapter directory (no adapter_model.safetensors).")
    spec_file = path / HEAD_SPEC_FILE
    spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    stored = _adapter_head_kind(path)
    if spec.setdefault("head", stored) != stored:
        raise RewardAdapterError(
            f"{path}: {HEAD_SPEC_FILE} says a {spec['head']} head, the weights hold a {stored} one."
        )
    expected = spec.get("base")
    if expected is not None:
        actual = base_description(model)
        if expected["fingerprint"] != actual["fingerprint"]:
            raise RewardAdapterError(
                f"Reward adapter {path} was trained on base {expected['name_or_path'] or expected['model_type']!r} "
                f"(hidden {expected['hidden_size']}, fingerprint {expected['fingerprint'][:12]}), but the model "
                f"given is {actual['name_or_path'] or actual['model_type']!r} (hidden {actual['hidden_size']}, "
                f"fingerprint {actual['fingerprint'][:12]})."
            )
    shapes = {name: getattr(param, "ds_shape", param.shape) for name, param in unwrap(model).named_parameters()}
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if "lora_A" not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A")[0]
            weight = shapes.get(f"{module}.weight", shapes.get(f"{module}.base_layer.weight"))
            if weight is None or f.get_slice(key).get_shape()[1] != weight[1]:
                raise RewardAdapterError(
                    f"Reward adapter {path} does not fit this base: {module!r} "
                    f"{'is missing' if weight is None else f'has input size {weight[1]}'} "
                    f"but the adapter expects input size {f.get_slice(key).get_shape()[1]}."
                )
    return spec


def load_reward_adapter(model: nn.Module, path: str | Path, adapter_name: str = "reward") -> nn.Module:
    """Load a reward adapter (and its head) onto ``model`` under ``adapter_name``, frozen.

    ``model`` may be a plain transformers model (it is wrapped in a ``PeftModel``) or a
    ``PeftModel`` already holding other adapters (e.g. the RL policy). Returns the peft model.
    """
    from peft import PeftModel

    spec = check_reward_adapter(model, path)
    base = unwrap(model)
    if not hasattr(base, HEAD_ATTR) or head_kind(getattr(base, HEAD_ATTR)) != spec["head"]:
        set_reward_head(base, spec["head"])
    getattr(base, HEAD_ATTR).requires_grad_(False)
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=False)
    else:
        model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=False)
    # Adapters saved before the encoding was recorded: read the last attended token.
    recorded = spec.get("encoding") or {"pad_token_id": None}
    encodings = {**getattr(model, _ENCODINGS_ATTR, {}), adapter_name: RewardEncoding(**recorded)}
    setattr(model, _ENCODINGS_ATTR, encodings)
    return model


def score_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str | list[dict[str, Any]]],
    batch_size: int = 16,
    max_length: int | None = None,
    encoding: RewardEncoding | None = None,
) -> torch.Tensor:
    """Rewards of whole texts (prompt + completion) or conversations, no grad, encoded and pooled
    as in reward training (``encoding``, default :func:`reward_encoding`); right-padded batches."""
    device = unwrap(model).get_input_embeddings().weight.device
    encoding = encoding or reward_encoding(model)
    pad = encoding.pad_token_id if encoding.pad_token_id is not None else (tokenizer.pad_token_id or 0)
    rewards = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            rows = [reward_ids(tokenizer, t, max_length, encoding) for t in texts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            rewards.append(score(model, input_ids, attention_mask, encoding).float().cpu())
    return torch.cat(rewards) if rewards else torch.empty(0)
