"""Attaching plugins to an already-built stock trainer, by wrapping a few of its bound methods.

Only the methods some enabled plugin needs are wrapped, on the instance (never the class), so
``attach(trainer, plugins=[])`` leaves the trainer untouched and other trainers are unaffected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from perl_plugins.checkpoint.zero import zero_stage
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.host import trainer_compat
from perl_plugins.host.loss_terms import LossTermRecorder, LossTerms
from perl_plugins.host.plugin_set import PluginSet
from perl_plugins.lazy import lazy_import

# torch and transformers load when a trainer is attached, not when plugins are listed.
torch = lazy_import("torch")
transformers = lazy_import("transformers")

if TYPE_CHECKING:
    from transformers import Trainer

# Name of the stock loss term per trainer family (first match in the MRO wins).
_BASE_LOSS_NAMES = {
    "RewardTrainer": "reward_loss",
    "DPOTrainer": "dpo_loss",
    "KTOTrainer": "kto_loss",
    "SFTTrainer": "sft_loss",
    "GRPOTrainer": "policy_loss",
    "RLOOTrainer": "policy_loss",
}
# Trainers whose compute_loss refuses return_outputs=True: their plugins see outputs=None.
_NO_OUTPUTS = {"GRPOTrainer", "RLOOTrainer"}


def trainer_family(trainer: Any) -> str:
    """The stock trl/transformers class a trainer is (or derives from), e.g. ``"DPOTrainer"``."""
    for cls in type(trainer).__mro__:
        if cls.__name__ in _BASE_LOSS_NAMES:
            return cls.__name__
    return "Trainer"


def base_loss_name(trainer: Any) -> str:
    """The name the stock loss is logged under; a plain Trainer on a one-label classifier trains a
    (pointwise) reward model."""
    family = trainer_family(trainer)
    if family in _BASE_LOSS_NAMES:
        return _BASE_LOSS_NAMES[family]
    config = getattr(trainer.model, "config", None)
    return "reward_loss" if getattr(config, "num_labels", None) == 1 else "base_loss"


class AttachedPlugins:
    """What :func:`attach` leaves on ``trainer.perl_plugins``: the plugin set and its options."""

    def __init__(self, plugin_set: PluginSet) -> None:
        self.plugin_set = plugin_set
        self.recorder = LossTermRecorder()
        # Batch keys a plugin's collator adds for its own loss term; the stock loss never sees them.
        self.private_inputs: set[str] = set()
        # Each plugin's own state, by plugin name (see :func:`state`); never new trainer attributes.
        self.state: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return self.plugin_set.names

    @property
    def options(self) -> dict[str, Any]:
        return self.plugin_set.options


def state(trainer: Any) -> dict[str, Any]:
    """Plugin state of an attached trainer, one entry per plugin: ``state(trainer)["grm"]``.

    Plugins keep what they build at attach time here rather than in new trainer attributes, so
    everything plugins added to a trainer is in one place (and goes with ``trainer.perl_plugins``).
    """
    return _attached(trainer).state


def _attached(trainer: Any) -> AttachedPlugins:
    attached = getattr(trainer, "perl_plugins", None)
    if attached is None:
        raise PluginIncompatibleError(f"No plugins are attached to this {type(trainer).__name__}: call attach() first.")
    return attached


def keep_columns(
    trainer: Any,
    columns: Sequence[str],
    *,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    private: Iterable[str] = (),
) -> None:
    """Feed a plugin's own dataset columns to its loss term, from ``perl_configure``.

    ``columns`` are kept past ``remove_unused_columns`` (which keeps only the model's ``forward``
    arguments); ``collator``, when given, becomes the trainer's data collator and receives the rows
    with those columns; ``private`` batch keys reach ``perl_compute_loss`` but never the stock loss.
    """
    attached = _attached(trainer)
    trainer_compat.keep_signature_columns(trainer, columns)
    if collator is not None:
        trainer.data_collator = collator
    attached.private_inputs.update(private)


def attach(trainer: Trainer, plugins: str | Sequence[Any] | None = None, **options: Any) -> Trainer:
    """Attach plugins to a built stock trainer and return it (for chaining).

    ``plugins`` is ``"grm,fp8"``, a list of names / local file paths / plugin modules, or
    ``None`` for the ``$PERL_PLUGINS`` default. ``options`` are the enabled plugins' options by
    field name (``grm_alpha=0.01``). Every check runs before the trainer is changed. Modules
    plugins add to the model (adapters, heads) follow the trainer's ``disable_dropout``, as trl's
    own model does.
    """
    if not isinstance(trainer, transformers.Trainer):
        raise PluginIncompatibleError(f"attach() needs a transformers.Trainer instance, got {type(trainer).__name__}.")
    if hasattr(trainer, "perl_plugins"):
        raise PluginIncompatibleError("Plugins are already attached to this trainer; attach once with every plugin.")
    plugin_set = PluginSet.from_names(plugins)
    plugin_set.configure_options(options)
    _check_required_plugins(trainer, plugin_set)
    if not plugin_set.plugins:
        return trainer
    _check_world_size(trainer)
    plugin_set.call("perl_check_trainer", trainer=trainer)

    snapshot, args_snapshot = dict(vars(trainer)), dict(vars(trainer.args))
    try:
        _install(trainer, plugin_set)
    except BaseException:
        # Nothing half-attached: restore the trainer's attributes (bound-method wrappers included)
        # and its training arguments, which perl_configure may have changed in place.
        vars(trainer).clear()
        vars(trainer).update(snapshot)
        vars(trainer.args).clear()
        vars(trainer.args).update(args_snapshot)
        raise
    return trainer


def _check_required_plugins(trainer: Trainer, plugin_set: PluginSet) -> None:
    """Reward functions that only work once a plugin binds them (``perl_requires_plugin``, e.g. a
    LoRA ``AdapterReward``) would otherwise fail inside the first training step."""
    for func in getattr(trainer, "reward_funcs", None) or ():
        needed = getattr(func, "perl_requires_plugin", None)
        if needed and needed not in plugin_set.names:
            name = getattr(func, "__name__", type(func).__name__)
            raise PluginIncompatibleError(
                f"The reward function {name!r} ({type(func).__name__}) needs the {needed!r} plugin, which is not "
                f"enabled (plugins: {plugin_set.names or 'none'}): add {needed} to the plugins."
            )


def _check_world_size(trainer: Trainer) -> None:
    """Refuse a launch whose processes would each train alone: e.g. ``accelerate launch`` or
    ``torchrun`` on CPU without ``use_cpu=True``, where every process sees world size 1, trains on
    all the data and writes the same checkpoints."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and trainer.args.world_size == 1:
        raise PluginIncompatibleError(
            f"This process was launched as one of {launched} (WORLD_SIZE={launched}), but its trainer runs alone "
            "(world size 1): every process would train its own copy and overwrite the others' checkpoints. "
            "Without GPUs pass use_cpu=True (--use_cpu true) so the processes train together over gloo."
        )


def _install(trainer: Trainer, plugin_set: PluginSet) -> None:
    attached = AttachedPlugins(plugin_set)
    trainer.perl_plugins = attached
    plugin_set.call("perl_configure", trainer=trainer)
    _prepare_models(trainer, plugin_set)
    plugin_set.call("perl_models_ready", trainer=trainer, model=trainer.model)
    _one_dtype_for_zero3(trainer)
    if plugin_set.implements("perl_compute_loss"):
        _wrap_compute_loss(trainer, attached)
    if plugin_set.implements("perl_create_optimizer"):
        _wrap_create_optimizer(trainer, plugin_set)
    if plugin_set.implements("perl_save_checkpoint"):
        _wrap_save_checkpoint(trainer, plugin_set)
    if plugin_set.implements("perl_load_checkpoint"):
        _wrap_load_checkpoint(trainer, plugin_set)
    if plugin_set.implements("perl_load_best_model"):
        _wrap_load_best_model(trainer, plugin_set)
    if plugin_set.implements("perl_shape_rewards"):
        _wrap_calculate_rewards(trainer, plugin_set)
    if any(plugin_set.implements(h) for h in ("perl_on_train_begin", "perl_on_step_end", "perl_on_log")):
        # First in line, so reporting callbacks (tensorboard, wandb, printer) see keys added by perl_on_log.
        trainer.callback_handler.callbacks.insert(0, _plugin_callback(trainer, plugin_set))


def _prepare_models(trainer: Trainer, plugin_set: PluginSet) -> None:
    if not plugin_set.implements("perl_prepare_model"):
        return
    model = plugin_set.chain("perl_prepare_model", "model", trainer.model, trainer=trainer, role="policy")
    if model is not trainer.model:
        trainer.model = trainer.model_wrapped = model
    if getattr(trainer.args, "disable_dropout", False):
        from trl.trainer import disable_dropout_in_model

        # trl disabled dropout in __init__, before plugins added modules (adapters, heads): do the same for those.
        disable_dropout_in_model(trainer.model)
    if getattr(trainer, "ref_model", None) is not None:
        trainer.ref_model = plugin_set.chain(
            "perl_prepare_model", "model", trainer.ref_model, trainer=trainer, role="reference"
        )
    funcs = getattr(trainer, "reward_funcs", None)
    if funcs:
        import torch.nn as nn

        trainer.reward_funcs = [
            plugin_set.chain("perl_prepare_model", "model", f, trainer=trainer, role="reward")
            if isinstance(f, nn.Module)
            else f
            for f in funcs
        ]


def _one_dtype_for_zero3(trainer: Trainer) -> None:
    """Under ZeRO-3 with bf16/fp16 the base was partitioned in that dtype at load, while modules
    added since (peft keeps new adapters in fp32) were not; ZeRO-3 needs one dtype and keeps fp32
    masters of what trains, so those are cast, losing nothing."""
    if zero_stage(trainer) != 3:
        return
    dtype = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.dtype()
    if dtype in (torch.bfloat16, torch.float16):
        for param in trainer.model.parameters():
            if not hasattr(param, "ds_id") and param.dtype != dtype:
                param.data = param.data.to(dtype)


def _wrap_compute_loss(trainer: Trainer, attached: AttachedPlugins) -> None:
    stock = trainer.compute_loss
    family = trainer_family(trainer)
    base_name = base_loss_name(trainer)
    plugin_set = attached.plugin_set
    # trl's SFT/DPO/KTO trainers pay an extra forward pass for return_outputs=True: ask for the
    # outputs only when the caller or some plugin's perl_compute_loss takes them.
    impls = plugin_set.hook.perl_compute_loss.get_hookimpls()
    plugins_want_outputs = any("outputs" in impl.argnames for impl in impls)
    if family == "Trainer" and base_name == "reward_loss":
        # A one-label classifier's loss (BCE or MSE) is a per-micro-batch mean that ignores
        # num_items_in_batch, yet the Trainer would take it as normalized over the accumulation
        # window (the model accepts loss kwargs) and never divide it: say so, as trl's RewardTrainer
        # does, and the Trainer divides the stock loss and the added terms alike.
        trainer.model_accepts_loss_kwargs = False

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        private = attached.private_inputs
        stock_inputs = {k: v for k, v in inputs.items() if k not in private} if private else inputs
        if family in _NO_OUTPUTS or not (return_outputs or plugins_want_outputs):
            loss, outputs = stock(model, stock_inputs, num_items_in_batch=num_items_in_batch), None
        else:
            loss, outputs = stock(model, stock_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        terms = LossTerms(base_name, loss)
        plugin_set.call("perl_compute_loss", trainer=trainer, model=model, inputs=inputs, outputs=outputs, terms=terms)
        if len(terms.names()) > 1:
            attached.recorder.record(terms, model.training)
        total = terms.total(_added_terms_scale(trainer, model, num_items_in_batch))
        return (total, outputs) if return_outputs else total

    stock_log = trainer.log

    def log(logs, *args, **kwargs):
        attached.recorder.flush(logs)
        return stock_log(logs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.log = log


def _added_terms_scale(trainer: Trainer, model: Any, num_items_in_batch: Any) -> float:
    """Plugins add per-micro-batch means. Where the stock loss is already normalized over the whole
    accumulation window (num_items_in_batch, or a trainer that scales itself), the trainer will not
    divide the total by the accumulation steps, so the added terms are divided here; otherwise the
    trainer divides all terms alike (Trainer.training_step's rule)."""
    if not model.training:
        return 1.0
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
            getattr(trainer, "compute_loss_func", None) is not None
        )
    return 1.0 / getattr(trainer, "current_gradient_accumulation_steps", 1) if scaled else 1.0


def _wrap_create_optimizer(trainer: Trainer, plugin_set: PluginSet) -> None:
    stock = trainer.create_optimizer

    def create_optimizer(model=None):
        if trainer.optimizer is None:
            optimizer = plugin_set.call("perl_create_optimizer", trainer=trainer, model=model or trainer.model)
            if optimizer is not None:
                trainer.optimizer = optimizer
        return stock(model) if model is not None else stock()

    trainer.create_optimizer = create_optimizer


def _wrap_save_checkpoint(trainer: Trainer, plugin_set: PluginSet) -> None:
    def save_checkpoint(stock, model, trial):
        checkpoint_dir = trainer_compat.checkpoint_dir(trainer, trial)
        handled = plugin_set.call("perl_save_checkpoint", trainer=trainer, model=model, checkpoint_dir=checkpoint_dir)
        if not handled:
            stock(model, trial)

    trainer_compat.wrap_save_checkpoint(trainer, save_checkpoint)


def _wrap_load_checkpoint(trainer: Trainer, plugin_set: PluginSet) -> None:
    def load_from_checkpoint(stock, resume_from_checkpoint, model=None):
        handled = plugin_set.call(
            "perl_load_checkpoint", trainer=trainer, model=model or trainer.model, checkpoint_dir=resume_from_checkpoint
        )
        if not handled:
            stock(resume_from_checkpoint, model)

    trainer_compat.wrap_load_from_checkpoint(trainer, load_from_checkpoint)
    if getattr(trainer, "is_deepspeed_enabled", False):
        # DeepSpeed resumes from its engine shards inside the training loop and never loads the
        # checkpoint's model weights itself: plugins see the checkpoint before the engine reads it.
        def training_loop(stock_loop, *args, resume_from_checkpoint=None, **kwargs):
            if resume_from_checkpoint is not None:
                plugin_set.call(
                    "perl_load_checkpoint", trainer=trainer, model=trainer.model, checkpoint_dir=resume_from_checkpoint
                )
            return stock_loop(*args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

        trainer_compat.wrap_inner_training_loop(trainer, training_loop)


def _wrap_load_best_model(trainer: Trainer, plugin_set: PluginSet) -> None:
    def load_best_model(stock):
        checkpoint_dir = trainer.state.best_model_checkpoint
        model = trainer.accelerator.unwrap_model(trainer.model)
        handled = plugin_set.call("perl_load_best_model", trainer=trainer, model=model, checkpoint_dir=checkpoint_dir)
        if not handled:
            stock()

    trainer_compat.wrap_load_best_model(trainer, load_best_model)


def _wrap_calculate_rewards(trainer: Trainer, plugin_set: PluginSet) -> None:
    if not trainer_compat.computes_rewards(trainer):
        raise PluginIncompatibleError(
            f"A plugin shapes RL rewards, but {type(trainer).__name__} computes no rewards (use GRPO or RLOO)."
        )

    def calculate_rewards(stock, inputs, prompts, completions, completion_ids_list):
        rewards = stock(inputs, prompts, completions, completion_ids_list)
        return plugin_set.chain(
            "perl_shape_rewards", "rewards", rewards, trainer=trainer, prompts=prompts, completions=completions
        )

    trainer_compat.wrap_calculate_rewards(trainer, calculate_rewards)


def _plugin_callback(trainer: Trainer, plugin_set: PluginSet) -> Any:
    """A ``TrainerCallback`` that forwards trainer events to the step/log hooks."""

    class _PluginCallback(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            plugin_set.call("perl_on_train_begin", trainer=trainer, model=trainer.model_wrapped)
            return control

        def on_step_end(self, args, state, control, **kwargs):
            plugin_set.call("perl_on_step_end", trainer=trainer, state=state, control=control)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {} if logs is None else logs
            plugin_set.call("perl_on_log", trainer=trainer, logs=logs, state=state, control=control)
            if state.log_history:  # Trainer.log stored a copy of logs before calling back: keep it in sync
                state.log_history[-1].update(logs)
            return control

    return _PluginCallback()
