"""``adapter_ckpt``: checkpoints that hold only what trains, written atomically and verified on resume.

Each ``checkpoint-<step>`` holds every adapter of a peft model (policy, frozen reward, ...) with
its ``modules_to_save`` heads, any other trainable parameter, the optimizer (its own dtypes, e.g.
FP8 states), scheduler, RNG state of every process and ``trainer_state.json``, under the stock file
names so that the stock ``--resume_from_checkpoint`` restores optimizer, scheduler, RNG and state
itself; this plugin only replaces the model-weights part. The directory is written under a temp
name, fsynced, given a manifest (sha256 of every file, base-model fingerprint, plugins, versions)
and renamed, so a crash never leaves a directory that passes as complete. Layout::

    checkpoint-<step>/
      adapters/<name>/adapter_model.safetensors, adapter_config.json   # one per peft adapter
      trainable.safetensors          # other trainable parameters (full fine-tuning, unfrozen heads)
      optimizer.pt  scheduler.pt  rng_state.pth | rng_state_<rank>.pth  trainer_state.json
      tokenizer/                     # only with adapter_ckpt_save_tokenizer
      perl_manifest.json             # written last

Under DeepSpeed (ZeRO-1/2/3) every process also writes its engine's shards (``global_step<N>/``,
``latest``), from which DeepSpeed resumes exactly at the same stage and world size; adapters and
trainable tensors are gathered from the ZeRO partitions (fp32 master copies), and ``optimizer.pt``
holds the optimizer state gathered per parameter (``adapter_ckpt_portable_optimizer``), so the same
checkpoint also resumes without DeepSpeed on any number of processes. The manifest records the
engine and world size, and a resume that DeepSpeed could not honour is refused before anything loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perl_plugins import hookimpl
from perl_plugins.host.attach import trainer_family
from perl_plugins.checkpoint.store import (
    BaseMismatchError,
    CheckpointError,
    MissingFileError,
    atomic_checkpoint_dir,
    base_fingerprint,
    is_complete,
    library_versions,
    load_tensors,
    prune_checkpoints,
    read_manifest,
    save_rng_state,
    save_tensors,
    verify_checkpoint,
)
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.lazy import lazy_import
from perl_plugins.models.card import current_command
from perl_plugins.models.reward import HEAD_SPEC_FILE, reward_head_spec
from perl_plugins.checkpoint.zero import (
    engine_name,
    full_values,
    portable_optimizer_state,
    zero_stage,
)

# Imported when a hook first runs: listing this plugin's options needs no torch.
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
_CHECKPOINT_RE = re.compile(r"checkpoint-\d+")

logger = logging.getLogger(__name__)
# model -> (exclusions, fingerprint): frozen base weights do not change during a run, and hashing
# a 100M-parameter base costs more than writing its adapter checkpoint.
_RUN_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class AdapterCkptOptions:
    adapter_ckpt_save_tokenizer: bool = field(
        default=False, metadata={"help": "Also save the tokenizer (processing class) in every checkpoint."}
    )
    adapter_ckpt_verify: bool = field(
        default=True,
        metadata={"help": "On resume, check every file's sha256 and the base-model fingerprint before loading."},
    )
    adapter_ckpt_portable_optimizer: bool = field(
        default=True,
        metadata={"help": "Under DeepSpeed, also gather the ZeRO-partitioned optimizer state into optimizer.pt, so "
                  "the checkpoint resumes without DeepSpeed at any world size (costs a gather of the trainable "
                  "parameters' optimizer state at each save)."},
    )


# ---------------------------------------------------------------- trainable tensors


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
    return {"adapters": adapters, "others": others, "exclusions": exclusions,
            "fingerprint": _run_fingerprint(model, exclusions)}


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
            "base": getattr(base.config, "_name_or_path", "") or None,
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
            raise CheckpointError(f"{directory}: adapter {name!r} has keys the model lacks: {result.unexpected_keys[:5]}")
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
        raise CheckpointError(f"{directory}: {TRAINABLE_FILE} has tensors the model lacks: {result.unexpected_keys[:5]}")


def _check_keys(directory: Path, what: str, found: Any, expected: Any) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{directory}: {what} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]} "
            f"({len(missing)} missing, {len(extra)} unexpected)."
        )


# ---------------------------------------------------------------- save / load


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _plugin_options(trainer: Any) -> dict[str, Any]:
    return {
        name: dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else None
        for name, opts in trainer.perl_plugins.options.items()
    }


def _shared_path(trainer: Any, path: Path | None) -> Path:
    """The writer's temp dir, on every process (rank 0 broadcasts it; a shared filesystem is assumed,
    as for the stock trainer's per-rank RNG files)."""
    if trainer.args.world_size <= 1:
        return path
    from accelerate.utils import broadcast_object_list

    box = [str(path) if path is not None else None]
    broadcast_object_list(box, from_process=0)
    return Path(box[0])


def _update_best_checkpoint(trainer: Any, run_dir: str) -> None:
    """Stock rule: the best checkpoint is recorded once it exists (the one being written counts)."""
    from transformers.trainer_utils import SaveStrategy

    state = trainer.state
    if trainer.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and state.best_global_step:
        best = os.path.join(run_dir, f"checkpoint-{state.best_global_step}")
        if state.best_global_step == state.global_step or os.path.exists(best):
            state.best_model_checkpoint = best


def _save_trainer_state(trainer: Any, directory: Path) -> None:
    """``trainer_state.json`` with the stateful callbacks' states, as ``Trainer._save_checkpoint``."""
    from transformers.trainer_callback import ExportableState

    stateful = trainer.state.stateful_callbacks
    for cb in [cb for cb in trainer.callback_handler.callbacks + [trainer.control] if isinstance(cb, ExportableState)]:
        name = cb.__class__.__name__
        if isinstance(stateful[name], list):
            stateful[name].append(cb.state())
        else:
            stateful[name] = cb.state()
    trainer.state.save_to_json(str(directory / TRAINER_STATE))


def prune(run_dir: str, limit: int, best: str | None) -> None:
    """Stock ``save_total_limit`` semantics on complete checkpoints: at most ``limit`` kept, the
    newest and the best among them (``limit`` 1 with an older best keeps two)."""
    keep = limit
    if best is not None and limit > 1:
        complete = sorted(
            (p for p in Path(run_dir).iterdir() if _CHECKPOINT_RE.fullmatch(p.name) and is_complete(p)),
            key=lambda p: int(p.name.removeprefix("checkpoint-")),
        )
        if Path(best).resolve() not in {p.resolve() for p in complete[-limit:]}:
            keep -= 1  # the best takes one of the limit's places
    prune_checkpoints(run_dir, keep, protect=best)


def save_checkpoint(trainer: Any, model: nn.Module, checkpoint_dir: str, opts: AdapterCkptOptions) -> Path:
    """Write ``checkpoint_dir`` atomically (called on every process; process 0 writes and commits)."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(model)
    if trainer.hp_search_backend is None:
        trainer.store_flos()
    run_dir = os.path.dirname(checkpoint_dir)
    _update_best_checkpoint(trainer, run_dir)
    writer = args.should_save
    zero = zero_stage(trainer) is not None
    portable = zero and opts.adapter_ckpt_portable_optimizer and not args.save_only_model
    metadata: dict[str, Any] = {}
    with (atomic_checkpoint_dir(checkpoint_dir, metadata) if writer else contextlib.nullcontext()) as tmp:
        tmp = _shared_path(trainer, tmp)
        if not args.save_only_model:
            # optimizer.pt (state dtypes kept) and scheduler.pt; under DeepSpeed, every process
            # writes its engine's shards (global_step*/), which resume at the same world size.
            trainer._save_optimizer_and_scheduler(str(tmp))
            if portable:
                state = portable_optimizer_state(trainer)  # every process takes part in the gather
                if writer:
                    torch.save(state, tmp / OPTIMIZER_FILE)
            trainer._save_scaler(str(tmp))
            save_rng_state(tmp, args.process_index, world_size=args.world_size)  # every process, its own file
        collected = collect_model_state(model, zero=True) if zero else None  # a collective under ZeRO
        if writer:
            metadata.update(write_model_state(model, tmp, collected))
            if opts.adapter_ckpt_save_tokenizer and trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(str(tmp / TOKENIZER_DIR))
            if getattr(trainer, "use_adaptive_entropy", False):  # GRPO reads it back in _load_optimizer_and_scheduler
                (tmp / "entropy_ctrl_state.json").write_text(
                    json.dumps({"entropy_coef": trainer.entropy_coef, "last_world_entropy": trainer._last_world_entropy})
                )
            _save_trainer_state(trainer, tmp)
            metadata.update(
                plugins=_jsonable(_plugin_options(trainer)),
                library_versions=library_versions(),
                trainer_class=f"{type(trainer).__module__}.{type(trainer).__qualname__}",
                trainer_family=trainer_family(trainer),
                command=current_command(),  # the training command, for the model card of an export
                global_step=trainer.state.global_step,
                world_size=args.world_size,
                engine=engine_name(trainer),
                portable_optimizer=portable or (not zero and not args.save_only_model),
            )
        if args.world_size > 1:
            trainer.accelerator.wait_for_everyone()  # every rank's RNG file is in before the commit
    if writer:
        if args.push_to_hub:
            trainer._push_from_checkpoint(checkpoint_dir)
        if args.save_total_limit:  # only now: the new checkpoint is complete
            prune(run_dir, args.save_total_limit, trainer.state.best_model_checkpoint)
    if args.world_size > 1:
        trainer.accelerator.wait_for_everyone()  # no process resumes work before the commit
    return Path(checkpoint_dir)


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


def check_resume_engine(trainer: Any, checkpoint_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Refuse a resume that would lose state: DeepSpeed reads only its own shards, written at its own
    world size; without DeepSpeed a DeepSpeed checkpoint needs its gathered optimizer.pt."""
    saved, saved_world = manifest.get("engine", "single"), manifest.get("world_size", 1)
    current, world = engine_name(trainer), trainer.args.world_size
    if zero_stage(trainer) is not None and (saved, saved_world) != (current, world):
        raise CheckpointError(
            f"{checkpoint_dir} was written by {saved} at world size {saved_world}; DeepSpeed resumes only its own "
            f"shards of the same ZeRO stage and world size, and this run is {current} at world size {world}. "
            "Resume with the checkpoint's DeepSpeed config and world size, or without DeepSpeed"
            + (" (adapters and the gathered optimizer.pt are then loaded)." if manifest.get("portable_optimizer")
               else ".")
        )
    if zero_stage(trainer) is None and saved.startswith("deepspeed") and not trainer.args.save_only_model:
        if not (Path(checkpoint_dir) / OPTIMIZER_FILE).is_file():
            raise CheckpointError(
                f"{checkpoint_dir} was written by {saved} without a gathered {OPTIMIZER_FILE} "
                f"(adapter_ckpt_portable_optimizer=false): resume it under DeepSpeed {saved} at world size "
                f"{saved_world}, where the engine's own shards hold the optimizer state."
            )


# ---------------------------------------------------------------- hooks


@hookimpl
def perl_plugin_options() -> type:
    return AdapterCkptOptions


@hookimpl
def perl_check_trainer(trainer: Any, options: dict[str, Any]) -> None:
    if getattr(trainer, "is_fsdp_enabled", False):
        raise PluginIncompatibleError("adapter_ckpt does not support FSDP (sharded parameters and optimizer states).")
    if trainer.args.save_on_each_node:
        raise PluginIncompatibleError("adapter_ckpt writes each checkpoint from one process: unset save_on_each_node.")
    if zero_stage(trainer) == 0 and options["adapter_ckpt"].adapter_ckpt_portable_optimizer:
        raise PluginIncompatibleError(
            "adapter_ckpt gathers optimizer state from ZeRO stages 1-3; this DeepSpeed config has stage 0. Use a ZeRO "
            "stage, or set adapter_ckpt_portable_optimizer=false (checkpoints then resume only under DeepSpeed)."
        )
    _warn_inside_generation_round(trainer)


def _warn_inside_generation_round(trainer: Any) -> None:
    """GRPO/RLOO reuse one generation round for ``steps_per_generation * num_iterations`` micro-steps
    and keep it only in memory: a checkpoint inside a round resumes with a fresh generation."""
    args = trainer.args
    steps_per_generation = getattr(args, "steps_per_generation", None)
    if not steps_per_generation or args.save_strategy != "steps" or args.save_steps < 1:
        return
    every = steps_per_generation * getattr(trainer, "num_iterations", 1)
    if (int(args.save_steps) * args.gradient_accumulation_steps) % every:
        logger.warning(
            "adapter_ckpt: %s generates every %d micro-steps (steps_per_generation * num_iterations), but "
            "save_steps=%d x gradient_accumulation_steps=%d is not a multiple of it: resuming from a checkpoint "
            "inside a generation round regenerates completions, so it will not repeat the uninterrupted run.",
            type(trainer).__name__, every, args.save_steps, args.gradient_accumulation_steps,
        )


@hookimpl
def perl_configure(trainer: Any, options: dict[str, Any]) -> None:
    # Under DeepSpeed the stock _load_best_model reads the engine shards each checkpoint holds.
    if trainer.args.load_best_model_at_end and zero_stage(trainer) is None:
        opts: AdapterCkptOptions = options["adapter_ckpt"]

        def _load_best_model() -> None:  # the stock one looks for full weights or a top-level adapter
            model = trainer.accelerator.unwrap_model(trainer.model)
            load_checkpoint(model, trainer.state.best_model_checkpoint, verify=opts.adapter_ckpt_verify)

        trainer._load_best_model = _load_best_model


@hookimpl
def perl_save_checkpoint(trainer: Any, model: Any, checkpoint_dir: str, options: dict[str, Any]) -> bool:
    save_checkpoint(trainer, model, checkpoint_dir, options["adapter_ckpt"])
    return True


@hookimpl
def perl_load_checkpoint(trainer: Any, model: Any, checkpoint_dir: str, options: dict[str, Any]) -> bool:
    # Runs before the stock resume path reads optimizer.pt, scheduler.pt, RNG and trainer state
    # (with torch.load(weights_only=True)), and under DeepSpeed before the engine reads its shards,
    # so every file is verified before any is used.
    verify = options["adapter_ckpt"].adapter_ckpt_verify
    model = trainer.accelerator.unwrap_model(model)
    manifest = check_checkpoint(model, checkpoint_dir, verify=verify)
    check_resume_engine(trainer, checkpoint_dir, manifest)
    if zero_stage(trainer) is None:  # DeepSpeed loads the trainable weights from its shards itself
        read_model_state(model, checkpoint_dir)
    return True
