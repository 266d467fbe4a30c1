"""Every hook a perl-plugins plugin can implement.

A plugin is a module (or object) with functions marked ``@perl_plugins.hookimpl`` whose names
match the specs below. Like pytest's hooks, an implementation may accept any subset of a spec's
arguments. Hooks fire in the order they are listed here over the life of one attached trainer.

Every hook receives ``options``: a mapping from plugin name to that plugin's options dataclass
instance (see :func:`perl_plugin_options`), so a plugin reads its own settings as
``options["grm"].grm_alpha``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # annotations only: importing the contract must not import torch (plugins are listed without it)
    import torch
    from transformers import Trainer, TrainerControl, TrainerState

    from perl_plugins.host.loss_terms import LossTerms

PROJECT = "perl_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def perl_plugin_options() -> type | None:
    """Declare this plugin's options.

    Fires: once per plugin while plugins are loaded, before anything is attached (also by
    ``perl-plugins plugins`` to list options, and by :class:`PluginArguments` to add flags).
    Returns: a dataclass *type* whose fields carry ``metadata={"help": ...}`` and defaults, with
    names prefixed by the plugin name (``grm_alpha``) so flags of different plugins never clash;
    validation belongs in its ``__post_init__``. ``None`` for a plugin without options.
    Result: the host asks each plugin separately; results are never merged.
    """


@hookspec
def perl_check_trainer(trainer: Trainer, options: dict[str, Any]) -> None:
    """Refuse a trainer this plugin cannot work with.

    Fires: in :func:`perl_plugins.attach`, for every enabled plugin, *before* anything is changed,
    so a refusal leaves the trainer exactly as it was.
    Returns: nothing; raise :class:`perl_plugins.errors.PluginIncompatibleError` (or another
    :class:`perl_plugins.errors.PluginError`) with a message naming the plugin and the problem.
    Must not modify the trainer. All implementations run.
    """


@hookspec
def perl_configure(trainer: Trainer, options: dict[str, Any]) -> None:
    """Adjust the trainer's training arguments or attributes.

    Fires: in :func:`perl_plugins.attach`, once, after every plugin's check passed and before
    models are prepared (e.g. the ``fp8`` plugin sets the trainer's optimizer class here).
    Returns: nothing; changes are made in place. All implementations run.
    """


@hookspec
def perl_prepare_model(
    trainer: Trainer, model: torch.nn.Module, role: str, options: dict[str, Any]
) -> torch.nn.Module | None:
    """Wrap or modify one of the trainer's models before training.

    Fires: in :func:`perl_plugins.attach`, once per role present on the trainer: ``"policy"``
    (``trainer.model``), ``"reference"`` (``trainer.ref_model`` when it exists) and ``"reward"``
    (each ``nn.Module`` in ``trainer.reward_funcs`` of GRPO/RLOO).
    Returns: a replacement model, or ``None`` to keep ``model`` (in-place changes are fine). The
    results chain: each implementation receives the model the previous one returned, so e.g.
    ``grm`` can add a reward head and ``lora`` then add adapters to that model.
    """


@hookspec
def perl_compute_loss(
    trainer: Trainer,
    model: torch.nn.Module,
    inputs: dict[str, Any],
    outputs: Any,
    terms: LossTerms,
    options: dict[str, Any],
) -> None:
    """Add or re-weight named loss terms around the trainer's own ``compute_loss``.

    Fires: on every training and evaluation step, right after the stock ``compute_loss`` ran
    (called with ``return_outputs=True`` when an implementation takes ``outputs``: trl's SFT/DPO/KTO
    trainers pay an extra forward pass for it). ``outputs`` is what the model returned to the stock
    loss; ``terms`` is a :class:`perl_plugins.host.loss_terms.LossTerms` holding the stock loss under
    a trainer-specific name (``reward_loss``, ``dpo_loss``, ``sft_loss``, ``policy_loss``...).
    Returns: nothing; call ``terms.add(name, value, weight)`` or ``terms.reweight(name, w)``. The
    trainer optimizes ``sum(weight * value)`` and every term is logged under its own name. All
    implementations run, in plugin order.
    """


@hookspec(firstresult=True)
def perl_create_optimizer(
    trainer: Trainer, model: torch.nn.Module, options: dict[str, Any]
) -> torch.optim.Optimizer | None:
    """Build the optimizer the trainer will use.

    Fires: once, when the trainer creates its optimizer at the start of ``train()``.
    Returns: a ``torch.optim.Optimizer``, or ``None`` to let the next plugin (and finally the
    trainer's own logic) decide. First result wins.
    """


@hookspec(firstresult=True)
def perl_save_checkpoint(
    trainer: Trainer, model: torch.nn.Module, checkpoint_dir: str, options: dict[str, Any]
) -> bool | None:
    """Write a checkpoint.

    Fires: each time the trainer saves a checkpoint (``save_steps`` / end of epoch), in place of
    ``Trainer._save_checkpoint``; ``checkpoint_dir`` is where the stock trainer would write.
    Returns: ``True`` when this plugin wrote the checkpoint (the stock save is skipped), ``None``
    to leave it to the next plugin or the stock trainer. First result wins.
    """


@hookspec(firstresult=True)
def perl_load_checkpoint(
    trainer: Trainer, model: torch.nn.Module, checkpoint_dir: str, options: dict[str, Any]
) -> bool | None:
    """Restore model-side state from a checkpoint when resuming.

    Fires: when ``train(resume_from_checkpoint=...)`` loads the model state, in place of
    ``Trainer._load_from_checkpoint``. Under DeepSpeed it fires before the engine is built and
    before DeepSpeed reads its own shards of the checkpoint (which it always does): a plugin
    checks the checkpoint there, and ``model`` is the model DeepSpeed is about to wrap.
    Returns: ``True`` when this plugin restored it (the stock loader is skipped), ``None``
    otherwise. First result wins.
    """


@hookspec
def perl_on_train_begin(trainer: Trainer, model: torch.nn.Module, options: dict[str, Any]) -> None:
    """Set up what needs the training-time model, e.g. a DDP communication hook.

    Fires: once per ``train()``, after the model was wrapped for distributed training (``model``
    is ``trainer.model_wrapped``: DDP, DeepSpeed engine, or the model itself) and the optimizer was
    built, before the first step.
    Returns: nothing; raise to refuse a setup that cannot work. All implementations run.
    """


@hookspec
def perl_on_step_end(trainer: Trainer, state: TrainerState, control: TrainerControl, options: dict[str, Any]) -> None:
    """React to the end of an optimizer step.

    Fires: after every optimizer step (``TrainerCallback.on_step_end``).
    Returns: nothing; set ``control.should_training_stop = True`` to stop. All implementations run.
    """


@hookspec
def perl_on_log(
    trainer: Trainer, logs: dict[str, float], state: TrainerState, control: TrainerControl, options: dict[str, Any]
) -> None:
    """See (and extend) every dict of logged metrics.

    Fires: each time the trainer logs (``TrainerCallback.on_log``), after loss terms were added.
    Returns: nothing; may add keys to ``logs`` or stop training via ``control``. All run.
    """


@hookspec
def perl_shape_rewards(
    trainer: Trainer, prompts: list[Any], completions: list[Any], rewards: torch.Tensor, options: dict[str, Any]
) -> torch.Tensor | None:
    """Reshape the rewards an RL trainer (GRPO/RLOO) computed from its reward functions.

    Fires: each generation round, after the reward functions ran and before advantages are
    computed. ``rewards`` is a float tensor of shape ``(num_completions, num_reward_funcs)``.
    Returns: a tensor of the same shape to replace it, or ``None`` to keep it. Results chain in
    plugin order (each implementation sees the previous result).
    """
