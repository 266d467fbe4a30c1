"""plugin_template: a minimal local plugin to copy and fill in. As shipped it changes nothing.

Copy it (``cp hooks/plugin_template.py hooks/my_plugin.py``), rename the options class and its
``plugin_template_`` prefix to ``my_plugin_`` (the plugin's name is the file's stem), uncomment
the hooks you need, and load it with ``--plugins ./hooks/my_plugin.py`` or
``perl_plugins.attach(trainer, plugins="./hooks/my_plugin.py", my_plugin_scale=0.5)``.

Every hook receives ``options``: {plugin name: options instance}; read yours as
``options["plugin_template"]``. A hook may declare only the arguments it uses. Hooks are listed
in the order they fire; the full contracts are in ``perl_plugins/hookspecs.py``. Only the hooks
you define are wired into the trainer, so keep unused ones commented out. Run with
``PERL_PLUGINS_TRACE=1`` to see each hook call (plugins, arguments, result, time) on stderr.
"""

import dataclasses
from typing import Any

import perl_plugins


@dataclasses.dataclass
class PluginTemplateOptions:
    # Each field becomes a flag (--plugin_template_scale) and an attach() keyword. Prefix every
    # name with the plugin name so options of different plugins never clash.
    plugin_template_scale: float = dataclasses.field(
        default=1.0, metadata={"help": "Example option: a factor your hooks could use."}
    )

    def __post_init__(self) -> None:
        # Validate here: a bad value is reported before the trainer is touched.
        if self.plugin_template_scale < 0:
            raise ValueError(f"plugin_template_scale must be >= 0, got {self.plugin_template_scale}")


@perl_plugins.hookimpl
def perl_plugin_options() -> type:
    """Declare the options dataclass (return None, or drop this hook, for a plugin without options)."""
    return PluginTemplateOptions


@perl_plugins.hookimpl
def perl_check_trainer(trainer: Any, options: dict[str, Any]) -> None:
    """Refuse trainers this plugin cannot handle. Must not modify anything; raise to refuse."""
    # from perl_plugins import trainer_family
    # from perl_plugins.errors import PluginIncompatibleError
    # if trainer_family(trainer) not in ("GRPOTrainer", "RLOOTrainer"):
    #     raise PluginIncompatibleError(f"plugin_template needs GRPO/RLOO, got {type(trainer).__name__}")


# Adjust training arguments or trainer attributes once, after every check passed.
# @perl_plugins.hookimpl
# def perl_configure(trainer, options):
#     trainer.args.max_grad_norm = 1.0


# Wrap or change a model; role is "policy", "reference" or "reward". Return a replacement model,
# or None to keep it (results chain across plugins).
# @perl_plugins.hookimpl
# def perl_prepare_model(trainer, model, role, options):
#     if role == "policy":
#         model.config.use_cache = False
#     return None


# Add or re-weight named loss terms after the stock loss ran; each term is logged by name.
# @perl_plugins.hookimpl
# def perl_compute_loss(trainer, model, inputs, outputs, terms, options):
#     scale = options["plugin_template"].plugin_template_scale
#     terms.add("l2_loss", sum((p**2).sum() for p in model.parameters() if p.requires_grad), weight=1e-6 * scale)


# Build the optimizer (first non-None result wins; None falls back to the trainer's own).
# @perl_plugins.hookimpl
# def perl_create_optimizer(trainer, model, options):
#     import torch
#     return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=trainer.args.learning_rate)


# Write a checkpoint yourself; return True to skip the stock save, None to let it run.
# @perl_plugins.hookimpl
# def perl_save_checkpoint(trainer, model, checkpoint_dir, options):
#     return None


# Restore model state when resuming; return True to skip the stock loader, None to let it run.
# @perl_plugins.hookimpl
# def perl_load_checkpoint(trainer, model, checkpoint_dir, options):
#     return None


# Once per train(), after the model was wrapped (DDP / DeepSpeed) and the optimizer built.
# @perl_plugins.hookimpl
# def perl_on_train_begin(trainer, model, options):
#     print(f"training {type(model).__name__} with {type(trainer.optimizer).__name__}")


# After every optimizer step; set control.should_training_stop = True to stop.
# @perl_plugins.hookimpl
# def perl_on_step_end(trainer, state, control, options):
#     if state.global_step >= 1000:
#         control.should_training_stop = True


# See every logged metrics dict; keys added here are logged too.
# @perl_plugins.hookimpl
# def perl_on_log(trainer, logs, state, control, options):
#     logs["plugin_template/scale"] = options["plugin_template"].plugin_template_scale


# GRPO/RLOO only: reshape the (num_completions, num_reward_funcs) reward tensor; return the new
# tensor or None to keep it (results chain across plugins).
# @perl_plugins.hookimpl
# def perl_shape_rewards(trainer, prompts, completions, rewards, options):
#     return rewards * options["plugin_template"].plugin_template_scale
