"""An ``adapter_ckpt`` checkpoint as a clean peft
adapter directory (``PeftModel.from_pretrained``, heads included) or, with ``--merge``, a standalone
model directory (``AutoModel*.from_pretrained``) with the adapter merged into the base weights.

The checkpoint is verified first (sha256 of every file). ``--merge`` loads the base from
``--base`` (default: the path the base was loaded from when training) and refuses a base whose
fingerprint differs from the one the checkpoint records.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from perl_plugins.checkpoint.model_state import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTERS_DIR,
    TOKENIZER_DIR,
    check_base,
    read_model_state,
)
from perl_plugins.checkpoint.store import verify_checkpoint
from perl_plugins.models.reward import HEAD_SPEC_FILE


class ExportError(ValueError):
    """A checkpoint that cannot be exported in the requested form."""


def _pick_adapter(manifest: dict[str, Any], adapter: str | None) -> str | None:
    model = manifest["model"]
    available = list(model["adapters"])
    if adapter is None:
        return model["active_adapter"]
    if adapter not in available:
        raise ExportError(f"The checkpoint has no adapter {adapter!r}; it has {available or 'none'}.")
    return adapter


def export_adapter(checkpoint: Path, out: Path, manifest: dict[str, Any], adapter: str | None = None) -> Path:
    """Copy one adapter (LoRA weights + ``modules_to_save`` heads) and the tokenizer, if saved."""
    name = _pick_adapter(manifest, adapter)
    if name is None:
        raise ExportError(f"{checkpoint} holds no peft adapter (full fine-tuning): export it with --merge.")
    if manifest["model"]["trainable_tensors"]:
        raise ExportError(
            f"{checkpoint} also trained tensors outside the adapter ({manifest['model']['trainable_tensors'][:3]}...), "
            "which a peft adapter directory cannot hold: export it with --merge."
        )
    out.mkdir(parents=True, exist_ok=True)
    for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copyfile(checkpoint / ADAPTERS_DIR / name / file, out / file)
    if (checkpoint / ADAPTERS_DIR / name / HEAD_SPEC_FILE).is_file():  # a reward adapter's scoring rule
        shutil.copyfile(checkpoint / ADAPTERS_DIR / name / HEAD_SPEC_FILE, out / HEAD_SPEC_FILE)
    _copy_tokenizer(checkpoint, out)
    return out


def build_model(checkpoint: Path, manifest: dict[str, Any], base: str | None = None, adapter: str | None = None) -> Any:
    """The base model with the checkpoint's (chosen) adapter and trainable tensors loaded, checked
    against the recorded base fingerprint."""
    import transformers
    from peft import PeftConfig, get_peft_model
    from transformers import AutoConfig

    recorded = manifest["model"]
    base = base or recorded["base"]
    if not base:
        raise ExportError(f"{checkpoint} was trained on a model built in memory: pass --base with its weights.")
    config_dict = dict(recorded["config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = getattr(transformers, recorded["class"]).from_pretrained(base, config=config)
    name = _pick_adapter(manifest, adapter)
    if name is not None:
        peft_config = PeftConfig.from_pretrained(str(checkpoint / ADAPTERS_DIR / name))
        model = get_peft_model(model, peft_config, adapter_name=name)
    check_base(model, checkpoint, manifest)
    read_model_state(model, checkpoint, strict=False)
    return model


def export_merged(
    checkpoint: Path, out: Path, manifest: dict[str, Any], base: str | None = None, adapter: str | None = None
) -> Path:
    """Save the base with the adapter merged in (and trainable tensors loaded) as a plain model."""
    if "grm" in (manifest.get("plugins") or {}):
        raise ExportError(
            f"{checkpoint} was trained with the grm plugin: its reward model carries the base's LM head (for the "
            f"regularizer) and possibly grm's MLP score head, which a stock {manifest['model']['class']} has no "
            "place for. Export the adapter (without --merge) and score with "
            "perl_plugins.models.reward.load_reward_adapter."
        )
    model = build_model(checkpoint, manifest, base, adapter)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(out))
    if not _copy_tokenizer(checkpoint, out):
        # A standalone model needs its tokenizer: take the base's (the checkpoint saved none).
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base or manifest["model"]["base"]).save_pretrained(str(out))
    return out


def _copy_tokenizer(checkpoint: Path, out: Path) -> bool:
    """Copy the tokenizer the checkpoint saved, if any; returns whether there was one."""
    if not (checkpoint / TOKENIZER_DIR).is_dir():
        return False
    shutil.copytree(checkpoint / TOKENIZER_DIR, out, dirs_exist_ok=True)
    return True


def export(
    checkpoint: str | Path, out: str | Path, *, merge: bool = False, base: str | None = None, adapter: str | None = None
) -> Path:
    """Verify ``checkpoint`` and export it to ``out`` (see the module docstring)."""
    checkpoint, out = Path(checkpoint), Path(out)
    manifest = verify_checkpoint(checkpoint)
    if "model" not in manifest:
        raise ExportError(f"{checkpoint} was not written by the adapter_ckpt plugin (no model record in its manifest).")
    from perl_plugins.models.card import write_export_card

    if merge:
        path = export_merged(checkpoint, out, manifest, base, adapter)
    else:
        path = export_adapter(checkpoint, out, manifest, adapter)
    write_export_card(checkpoint, path, manifest)
    return path
