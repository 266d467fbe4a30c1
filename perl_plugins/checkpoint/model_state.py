"""The model part of an ``adapter_ckpt`` checkpoint: which tensors it holds (every peft adapter with
its heads, other trainable parameters), under which names, and how they are written, checked against
the base they were trained on, and read back. ``perl_plugins.checkpoint.store`` makes the directory
atomic and verified; the ``adapter_ckpt`` plugin adds the trainer's own state; ``export`` reads this.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any

from perl_plugins.checkpoint.store import (
    BaseMismatchError,
    CheckpointError,
    MissingFileError,
    base_fingerprint,
    load_tensors,
    read_manifest,
    save_tensors,
    verify_checkpoint,
)
from perl_plugins.checkpoint.zero import full_values
from perl_plugins.lazy import lazy_import
from perl_plugins.models.reward import HEAD_SPEC_FILE, reward_head_spec

torch = lazy_import("torch")
nn = lazy_import("torch.nn")

ADAPTERS_DIR = "adapters"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINABLE_FILE = "trainable.safetensors"
TOKENIZER_DIR = "tokenizer"
TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
OPTIMIZER_FILE = "optimizer.pt"  # transformers.trainer.OPTIMIZER_NAME
_PEFT_PREFIX = "base_model.model."
_PEFT_WRAPPERS = {"base_layer", "original_module"}


# model -> (exclusions, fingerprint): frozen base weights do not change during a run, and hashing
# a 100M-parameter base costs more than writing its adapter checkpoint.
_RUN_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_state(
    model: nn.Module, adapter: str, values: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """One adapter's tensors (LoRA weights and ``modules_to_save`` heads), peft's key names; taken
    from ``values`` (full copies by parameter name, see :func:`full_values`) when given."""
    from peft import get_peft_model_state_dict

    # No embedding copies: a checkpoint holds what trains; a base with a resized vocabulary is the base.
    return get_peft_model_state_dict(model, state_dict=values, adapter_name=adapter, save_embedding_layers=False)


def trainable_state(
    model: nn.Module, values: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``(adapters, others)``: every peft adapter's state dict by adapter name, and every other
    trainable parameter (by ``named_parameters`` name) that no adapter state already holds; from
    ``values`` when given (distinct tensors, by parameter name), else from the model itself."""
    adapters = {name: adapter_state(model, name, values) for name in model.peft_config} if is_peft_model(model) else {}
    held = {t.data_ptr() for state in adapters.values() for t in state.values()}
    source = values if values is not None else {n: p.detach() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    others = {n: t for n, t in source.items() if n in trainable and t.data_ptr() not in held}
    return adapters, others


def _base_name(name: str) -> str:
    """A parameter name as the fingerprint sees it: the plain model's, without peft wrappers."""
    return ".".join(s for s in name.removeprefix(_PEFT_PREFIX).split(".") if s not in _PEFT_WRAPPERS)


def fingerprint_exclusions(model: nn.Module, others: dict[str, torch.Tensor]) -> list[str]:
    """Parameters that are not part of the base: those saved in the checkpoint, and the originals
    of heads that an adapter replaces (freshly initialised on every load, never used)."""
    replaced = {_base_name(n) for n, _ in model.named_parameters() if ".original_module." in n}
    return sorted(replaced | {_base_name(n) for n in others})


def fingerprint(model: nn.Module, exclusions: list[str]) -> dict[str, Any]:
    excluded = set(exclusions)
    return base_fingerprint(model, exclude=excluded.__contains__)


def _run_fingerprint(model: nn.Module, exclusions: list[str]) -> dict[str, Any]:
    """:func:`fingerprint`, computed at the first save of a model and reused by later ones."""
    cached = _RUN_FINGERPRINTS.get(model)
    if cached is None or cached[0] != exclusions:
        cached = _RUN_FINGERPRINTS[model] = (exclusions, fingerprint(model, exclusions))
    return cached[1]


def collect_model_state(model: nn.Module, *, zero: bool = False) -> dict[str, Any]:
    """Every tensor a checkpoint of ``model`` holds, and its manifest metadata. With ``zero`` (a
    DeepSpeed run) the tensors are full copies gathered from ZeRO partitions: call it on every
    process."""
    values = full_values(model) if zero else None
    adapters, others = trainable_state(model, values)
    exclusions = fingerprint_exclusions(model, others)
    return {
        "adapters": adapters,
        "others": others,
        "exclusions": exclusions,
        "fingerprint": _run_fingerprint(model, exclusions),
    }


def write_model_state(model: nn.Module, directory: Path, collected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every trainable tensor of ``model`` (or what :func:`collect_model_state` collected)
    into ``directory``; returns manifest metadata."""
    collected = collected or collect_model_state(model)
    adapters, others, exclusions = collected["adapters"], collected["others"], collected["exclusions"]
    for name, state in adapters.items():
        adapter_dir = directory / ADAPTERS_DIR / name
        adapter_dir.mkdir(parents=True)
        save_tensors(adapter_dir / ADAPTER_WEIGHTS, state, metadata={"format": "pt"})
        model.peft_config[name].save_pretrained(str(adapter_dir))
        spec = reward_head_spec(model, name)
        if spec is not None:  # scored later exactly as trained (the pad id trl set is not in the base config)
            (adapter_dir / HEAD_SPEC_FILE).write_text(json.dumps(spec, indent=2))
    if others:
        save_tensors(directory / TRAINABLE_FILE, others, metadata={"format": "pt"})
    base = model.get_base_model() if is_peft_model(model) else model
    return {
        "base_fingerprint": collected["fingerprint"],
        "fingerprint_exclusions": exclusions,
        "model": {
            "class": type(base).__name__,
            "base": base.config.name_or_path or None,
            "config": json.loads(base.config.to_json_string(use_diff=False)),
            "active_adapter": model.active_adapter if adapters else None,
            "adapters": {
                name: {"trainable": any(p.requires_grad for n, p in model.named_parameters() if f".{name}." in n)}
                for name in adapters
            },
            "trainable_tensors": sorted(others),
        },
    }


def check_base(model: nn.Module, checkpoint_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Raise :class:`BaseMismatchError` unless ``model``'s frozen base is the one the checkpoint
    was trained on."""
    recorded = manifest.get("base_fingerprint")
    given = fingerprint(model, manifest.get("fingerprint_exclusions", []))
    if not isinstance(recorded, dict) or recorded.get("id") != given["id"]:
        raise BaseMismatchError(checkpoint_dir, recorded if isinstance(recorded, dict) else None, given)


def read_model_state(model: nn.Module, checkpoint_dir: str | os.PathLike, *, strict: bool = True) -> None:
    """Load the checkpoint's tensors into ``model``: each adapter the model has, and the other
    trainable tensors. Every key must match; with ``strict`` (resume) the checkpoint must also
    hold no adapter the model lacks and every trainable parameter of the model."""
    directory = Path(checkpoint_dir)
    model_adapters = list(model.peft_config) if is_peft_model(model) else []
    saved = sorted(p.name for p in (directory / ADAPTERS_DIR).iterdir()) if (directory / ADAPTERS_DIR).is_dir() else []
    if strict and set(saved) - set(model_adapters):
        raise CheckpointError(
            f"{directory} holds adapters {sorted(set(saved) - set(model_adapters))} that the model lacks "
            f"(it has {model_adapters}); build the trainer with the same plugins and adapters."
        )
    from peft import set_peft_model_state_dict

    for name in model_adapters:
        state = load_tensors(directory / ADAPTERS_DIR / name / ADAPTER_WEIGHTS)  # MissingFileError names it
        _check_keys(directory, f"adapter {name!r}", state.keys(), adapter_state(model, name).keys())
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        if result.unexpected_keys:
            raise CheckpointError(
                f"{directory}: adapter {name!r} has keys the model lacks: {result.unexpected_keys[:5]}"
            )
    expected_others = trainable_state(model)[1] if strict else {}
    file = directory / TRAINABLE_FILE
    if not file.is_file():
        if expected_others:
            raise MissingFileError(TRAINABLE_FILE, directory)
        return
    others = load_tensors(file)
    if strict:
        _check_keys(directory, TRAINABLE_FILE, others.keys(), expected_others.keys())
    result = model.load_state_dict(others, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: {TRAINABLE_FILE} has tensors the model lacks: {result.unexpected_keys[:5]}"
        )


def _check_keys(directory: Path, what: str, found: Any, expected: Any) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{directory}: {what} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]} "
            f"({len(missing)} missing, {len(extra)} unexpected)."
        )


def check_checkpoint(model: nn.Module, checkpoint_dir: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Verify ``checkpoint_dir`` (files, base model; only the manifest's presence without
    ``verify``) and return its manifest."""
    if not verify:
        return read_manifest(Path(checkpoint_dir))
    manifest = verify_checkpoint(checkpoint_dir)
    check_base(model, checkpoint_dir, manifest)
    return manifest


def load_checkpoint(model: nn.Module, checkpoint_dir: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Verify ``checkpoint_dir`` and load its trainable tensors into ``model``; returns the manifest."""
    manifest = check_checkpoint(model, checkpoint_dir, verify=verify)
    read_model_state(model, checkpoint_dir)
    return manifest
