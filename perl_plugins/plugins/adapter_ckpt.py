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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perl_plugins import hookimpl, push_checkpoint, save_entropy_control, save_optimizer_state, trainer_family
from perl_plugins.checkpoint.model_state import (
    OPTIMIZER_FILE,
    TOKENIZER_DIR,
    TRAINER_STATE,
    check_checkpoint,
    collect_model_state,
    load_checkpoint,
    read_model_state,
    write_model_state,
)
from perl_plugins.checkpoint.store import (
    CheckpointError,
    atomic_checkpoint_dir,
    library_versions,
    prune_to_limit,
    save_rng_state,
)
from perl_plugins.checkpoint.zero import engine_name, portable_optimizer_state, zero_stage
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.lazy import lazy_import
from perl_plugins.models.card import current_command

# Imported when a hook first runs: listing this plugin's options needs no torch.
torch = lazy_import("torch")
nn = lazy_import("torch.nn")

logger = logging.getLogger(__name__)


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
        metadata={
            "help": "Under DeepSpeed, also gather the ZeRO-partitioned optimizer state into optimizer.pt, so "
            "the checkpoint resumes without DeepSpeed at any world size (costs a gather of the trainable "
            "parameters' optimizer state at each save)."
        },
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
    if (
        trainer.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        and state.best_global_step
    ):
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
    with atomic_checkpoint_dir(checkpoint_dir, metadata) if writer else contextlib.nullcontext() as tmp:
        tmp = _shared_path(trainer, tmp)
        if not args.save_only_model:
            # optimizer.pt (state dtypes kept) and scheduler.pt; under DeepSpeed, every process
            # writes its engine's shards (global_step*/), which resume at the same world size.
            save_optimizer_state(trainer, str(tmp))
            if portable:
                state = portable_optimizer_state(trainer)  # every process takes part in the gather
                if writer:
                    torch.save(state, tmp / OPTIMIZER_FILE)
            save_rng_state(tmp, args.process_index, world_size=args.world_size)  # every process, its own file
        collected = collect_model_state(model, zero=True) if zero else None  # a collective under ZeRO
        if writer:
            metadata.update(write_model_state(model, tmp, collected))
            if opts.adapter_ckpt_save_tokenizer and trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(str(tmp / TOKENIZER_DIR))
            save_entropy_control(trainer, str(tmp))  # GRPO's adaptive entropy coefficient, read back on resume
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
            push_checkpoint(trainer, checkpoint_dir)
        if args.save_total_limit:  # only now: the new checkpoint is complete
            prune_to_limit(run_dir, args.save_total_limit, trainer.state.best_model_checkpoint)
    if args.world_size > 1:
        trainer.accelerator.wait_for_everyone()  # no process resumes work before the commit
    return Path(checkpoint_dir)


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
            + (
                " (adapters and the gathered optimizer.pt are then loaded)."
                if manifest.get("portable_optimizer")
                else "."
            )
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
            type(trainer).__name__,
            every,
            args.save_steps,
            args.gradient_accumulation_steps,
        )


@hookimpl
def perl_load_best_model(trainer: Any, model: Any, checkpoint_dir: str, options: dict[str, Any]) -> bool | None:
    # The stock loader looks for full weights or a top-level adapter; under DeepSpeed it reads the
    # engine shards each checkpoint holds, so it is left to do that.
    if zero_stage(trainer) is not None:
        return None
    load_checkpoint(model, checkpoint_dir, verify=options["adapter_ckpt"].adapter_ckpt_verify)
    return True


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
