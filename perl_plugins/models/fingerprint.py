"""Cheap, deterministic fingerprint of the frozen base model under an adapter.

An adapter checkpoint holds only what trains, so it is only meaningful on top of
the exact base it was trained on.  :func:`base_fingerprint` identifies that base
from three parts, each hashed separately so a mismatch can say *what* differs:

* ``config``: ``model.config.to_dict()`` without the keys in
  :data:`VOLATILE_CONFIG_KEYS` (load paths, library versions, the load-time dtype
  hint, attention backend, runtime flags that trainers flip such as ``use_cache``
  or ``pad_token_id``, task-head label names).  The dtype hint is dropped because the real parameter
  dtypes are hashed in ``layout``.
* ``layout``: name, shape and dtype of every base parameter.
* ``weights``: per parameter, the wrap-around integer sum of all its bytes
  (viewed as 64/32/16/8-bit words) plus sha256 of a strided sample of words.
  Integer addition is associative, so the sum is bit-identical on any device and
  thread count, and it catches a change to any single weight; reading 100M
  float32 parameters takes tens of milliseconds on CPU.

Which parameters are "base": a parameter is *not* decided by ``requires_grad``,
because a freshly loaded model without adapters has every parameter trainable.
Instead peft adapter tensors are recognised by name (a dotted segment starting
with ``lora_`` or the attached peft tuner's own prefix, or a ``modules_to_save``
segment), plus whatever the caller's ``exclude`` matches.  Names are normalised
to the plain model's (peft's ``base_model.model.`` prefix and ``base_layer`` /
``original_module`` wrapper segments are removed), so the same base gives the
same fingerprint with or without peft adapters attached.

Limitations: parameters must be materialised tensors.  DeepSpeed ZeRO-3 shards are
gathered one parameter at a time (a collective: every process must fingerprint);
meta tensors, FSDP shards (DTensor) and bitsandbytes-quantised weights fingerprint
their local representation, so compute the fingerprint where the full base
weights are present (e.g. before sharding).  Loading the same base in another
dtype gives another id, on purpose: the bytes the adapter trained against differ.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from perl_plugins.lazy import lazy_import
from perl_plugins.models.gather import gathered

# Imported on first use: the adapter_ckpt plugin imports this module while plugins are only listed.
torch = lazy_import("torch")

__all__ = ["VOLATILE_CONFIG_KEYS", "base_fingerprint", "describe_base", "fingerprint_differences"]

VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",  # None when built from a config, set after from_pretrained
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "use_cache",  # Trainer sets it from args / gradient checkpointing
        "pad_token_id",  # trl's RewardTrainer sets it from the tokenizer
        "perl_reward_append_eos",  # pointwise reward training records how it encoded texts
        # Task-head labels: the head's shape is in the layout; labels are naming, and a
        # backbone-only fingerprint (exclude=...) must match across head types.
        "id2label",
        "label2id",
        "problem_type",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        # task-head settings: the same backbone serves a causal LM and a one-label reward classifier
        "num_labels",
    }
)

# Segments peft inserts between the plain model's module name and its parameter.
_PEFT_WRAPPER_SEGMENTS = frozenset({"base_layer", "original_module"})
_PEFT_PREFIX = "base_model.model."
_SAMPLE_WORDS = 1024  # strided words hashed per tensor, on top of the full sum
_EDGE_WORDS = 16  # first/last words always hashed
_WORD_DTYPES = ((8, "int64"), (4, "int32"), (2, "int16"), (1, "uint8"))  # names: torch loads lazily


def base_fingerprint(model: torch.nn.Module, *, exclude: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Fingerprint the frozen base of ``model`` (a plain model or a peft ``PeftModel``).

    ``exclude`` receives each normalised parameter name and returns True to leave
    it out, in addition to peft adapter tensors (e.g. a value head or another
    plugin's own trainable modules).

    Returns a JSON-serialisable dict: ``id`` (16 hex chars over everything below),
    ``config_sha256``, ``layout_sha256``, ``weights_sha256``, the filtered
    ``config``, and informational ``name``, ``architecture``, ``num_params``,
    ``num_tensors`` that are not part of the id.
    """
    adapter_prefixes: tuple[str, ...] = ("lora_",)
    if hasattr(model, "get_base_model"):  # peft PeftModel
        tuner_prefix = getattr(getattr(model, "base_model", None), "prefix", None)
        if isinstance(tuner_prefix, str) and tuner_prefix:
            adapter_prefixes += (tuner_prefix,)
        model = model.get_base_model()

    raw_config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    # JSON round trip so a fingerprint read back from a manifest equals a fresh one (id2label's
    # int keys become strings); default=str for enums/dtypes some configs hold.
    config_json = json.dumps(_strip_volatile(raw_config), sort_keys=True, default=str)
    config = json.loads(config_json)
    config_sha = hashlib.sha256(config_json.encode()).hexdigest()

    base_params = {}
    for raw_name, param in model.named_parameters():
        segments = raw_name.removeprefix(_PEFT_PREFIX).split(".")
        if any(s == "modules_to_save" or s.startswith(adapter_prefixes) for s in segments):
            continue
        name = ".".join(s for s in segments if s not in _PEFT_WRAPPER_SEGMENTS)
        if exclude is None or not exclude(name):
            base_params[name] = param

    layout = hashlib.sha256()
    weights = hashlib.sha256()
    for name in sorted(base_params):  # sorted: wrapping modules must not change the order
        param = base_params[name]
        with gathered([param]):  # a ZeRO-3 shard is hashed whole, one parameter at a time
            entry = f"{name}|{tuple(param.shape)}|{param.dtype}\n".encode()
            layout.update(entry)
            weights.update(entry)
            weights.update(_tensor_digest(param.detach()))

    layout_sha, weights_sha = layout.hexdigest(), weights.hexdigest()
    return {
        "id": hashlib.sha256(f"{config_sha}{layout_sha}{weights_sha}".encode()).hexdigest()[:16],
        "name": raw_config.get("_name_or_path") or None,
        "architecture": type(model).__name__,
        "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in base_params.values()),
        "num_tensors": len(base_params),
        "config_sha256": config_sha,
        "layout_sha256": layout_sha,
        "weights_sha256": weights_sha,
        "config": config,
    }


def describe_base(fingerprint: dict[str, Any]) -> str:
    """One line naming a base fingerprint for humans, e.g. in error messages."""
    config = fingerprint.get("config") or {}
    text_config = config.get("text_config") or {}
    details = [str(config.get("model_type") or fingerprint.get("architecture") or "unknown model type")]
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        value = config.get(key, text_config.get(key))
        if value is not None:
            details.append(f"{key}={value}")
    if fingerprint.get("num_params") is not None:
        details.append(f"{fingerprint['num_params']:,} base params")
    details.append(f"id={fingerprint.get('id')}")
    name = fingerprint.get("name") or "<unnamed>"
    return f"{name!r} ({', '.join(details)})"


def fingerprint_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Which parts of two fingerprints differ, most structural first."""
    diffs = []
    if a.get("config_sha256") != b.get("config_sha256"):
        ca, cb = a.get("config") or {}, b.get("config") or {}
        keys = sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))
        diffs.append(f"config ({', '.join(keys)})" if keys else "config")
    if a.get("layout_sha256") != b.get("layout_sha256"):
        diffs.append("parameter names/shapes/dtypes")
    elif a.get("weights_sha256") != b.get("weights_sha256"):
        diffs.append("weight values")
    return diffs


def _strip_volatile(value: Any) -> Any:
    # Composite configs nest sub-configs (text_config, vision_config) with their own copies.
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
    return value


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    word_dtype = getattr(torch, next(dt for size, dt in _WORD_DTYPES if flat.numel() % size == 0))
    words = flat.view(word_dtype)
    # Wrap-around integer sum: order-independent, so identical on every device/thread count.
    total = int(words.sum(dtype=word_dtype)) if word_dtype != torch.uint8 else int(words.sum())
    step = max(1, words.numel() // _SAMPLE_WORDS)
    sample = torch.cat([words[:_EDGE_WORDS], words[-_EDGE_WORDS:], words[::step]]).cpu()
    return total.to_bytes(8, "little", signed=True) + hashlib.sha256(sample.numpy().tobytes()).digest()
