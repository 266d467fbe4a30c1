"""``fp8``: FP8-LM (arXiv 2310.18313) on stock trainers — :class:`FP8AdamW` (FP8 first moment,
scaled FP16 second moment; a 2-byte mode with a block-scaled FP8 second moment) built with the
trainer's own lr / betas / eps / weight decay, over the trainable parameters only (with ``lora``:
the adapters), and an FP8 gradient all-reduce for multi-process DDP (``fp8_comm``).

Under DeepSpeed ZeRO-1/2/3, FP8AdamW is passed to DeepSpeed as its client optimizer and steps each
process's flat fp32 partition, with one set of scales per tensor fragment in it (DeepSpeed's
offsets; :meth:`FP8AdamW.set_segments`), not one per partition. It fails loudly: another optimizer requested (``--optim``,
``optimizers=``, ``optimizer_cls_and_kwargs``), a DeepSpeed config that builds its own optimizer
or offloads it (ZeRO-Offload), or ``fp8_comm`` without DDP raise a clear error; it never trains
with something else in silence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import perl_plugins
from perl_plugins import hookimpl
from perl_plugins.checkpoint.zero import partition_pieces
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.lazy import lazy_import

__all__ = ["FP8AdamW", "FP8Options"]  # noqa: F822 (FP8AdamW: module __getattr__, imports torch)

# The optimizer (torch) is imported when a hook first runs, not when plugins are listed.
fp8_optim = lazy_import("perl_plugins.plugins.fp8.optim")

logger = logging.getLogger(__name__)
# What TrainingArguments picks when --optim is not given (it upgrades adamw_torch to the fused
# kernel where available); anything else is a request for another optimizer.
_DEFAULT_OPTIMS = {"adamw_torch", "adamw_torch_fused"}


@dataclass
class FP8Options:
    fp8_second_moment: str = field(
        default="fp16",
        metadata={
            "help": "Second-moment format: 'fp16' (FP8-LM, per-tensor scale, ~3 bytes/param) or 'fp8' "
            "(2-byte mode: sqrt(v) in E4M3 with one scale per 256 values)."
        },
    )
    fp8_min_numel: int = field(
        default=4096, metadata={"help": "Tensors with fewer values keep fp32 states (not worth compressing)."}
    )
    fp8_master_weights: bool = field(
        default=False, metadata={"help": "Keep scaled fp16 master weights for bf16/fp16 parameters (full fine-tuning)."}
    )
    fp8_nonfinite: str = field(
        default="skip",
        metadata={"help": "On a NaN/inf update: 'skip' that tensor's step (counted in the logs) or 'raise'."},
    )
    fp8_kernel: str | None = field(
        default=None,
        metadata={
            "help": "Optimizer step kernel: 'cpp' (C++ CPU kernel, the default on CPU), 'compile' "
            "(torch.compile, the default elsewhere) or 'eager'."
        },
    )
    fp8_comm: bool = field(
        default=False, metadata={"help": "All-reduce gradients in FP8 with a shared automatic scale (DDP only)."}
    )

    def __post_init__(self) -> None:
        if self.fp8_second_moment not in ("fp16", "fp8"):
            raise ValueError(f"fp8_second_moment must be 'fp16' or 'fp8', got {self.fp8_second_moment!r}.")
        if self.fp8_nonfinite not in ("skip", "raise"):
            raise ValueError(f"fp8_nonfinite must be 'skip' or 'raise', got {self.fp8_nonfinite!r}.")
        if self.fp8_kernel not in (None, "cpp", "compile", "eager"):
            raise ValueError(f"fp8_kernel must be 'cpp', 'compile' or 'eager', got {self.fp8_kernel!r}.")
        if self.fp8_min_numel < 0:
            raise ValueError(f"fp8_min_numel must be >= 0, got {self.fp8_min_numel}.")


def _deepspeed_builds_optimizer(args: Any) -> bool:
    config = getattr(args, "hf_deepspeed_config", None)
    return config is not None and "optimizer" in config.config


@hookimpl
def perl_plugin_options() -> type:
    return FP8Options


@hookimpl
def perl_check_trainer(trainer: Any, options: dict[str, Any]) -> None:
    args = trainer.args
    if trainer.optimizer is not None or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise PluginIncompatibleError(
            "fp8: this trainer was given its own optimizer (optimizers= or optimizer_cls_and_kwargs=); "
            "drop it or drop the fp8 plugin — two optimizers cannot both train the model."
        )
    optim = getattr(args.optim, "value", args.optim)
    if optim not in _DEFAULT_OPTIMS:
        raise PluginIncompatibleError(
            f"fp8: --optim {optim} was requested, but the fp8 plugin trains with FP8AdamW; "
            "remove --optim or the fp8 plugin."
        )
    config = getattr(args, "hf_deepspeed_config", None)
    if config is not None and config.is_offload():
        raise PluginIncompatibleError(
            "fp8: the DeepSpeed config offloads the optimizer or parameters (ZeRO-Offload), which steps on the CPU "
            "with DeepSpeed's own CPU Adam; FP8AdamW cannot be that optimizer. Remove offload_optimizer / "
            "offload_param from the config, or drop the fp8 plugin."
        )
    if _deepspeed_builds_optimizer(args):
        raise PluginIncompatibleError(
            "fp8: the DeepSpeed config defines its own 'optimizer', so DeepSpeed would build it instead of "
            "FP8AdamW; remove the 'optimizer' section so FP8AdamW is passed to DeepSpeed as the client optimizer."
        )
    if options["fp8"].fp8_comm:
        if args.world_size < 2:
            raise PluginIncompatibleError("fp8_comm=true needs multi-process DDP training; this run has one process.")
        if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
            raise PluginIncompatibleError(
                "fp8_comm is a DDP communication hook; DeepSpeed and FSDP reduce gradients themselves."
            )


@hookimpl
def perl_create_optimizer(trainer: Any, model: Any, options: dict[str, Any]) -> Any:
    opts: FP8Options = options["fp8"]
    args = trainer.args
    decay = set(trainer.get_decay_parameter_names(model))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]
    optimizer = fp8_optim.FP8AdamW(
        [g for g in groups if g["params"]],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        second_moment=opts.fp8_second_moment,
        min_numel=opts.fp8_min_numel,
        master_weights=opts.fp8_master_weights,
        nonfinite=opts.fp8_nonfinite,
        kernel=opts.fp8_kernel,
    )
    if opts.fp8_comm:
        perl_plugins.state(trainer)["fp8"] = _comm_state_saved_with(optimizer)
    return optimizer


def _comm_state_saved_with(optimizer: Any) -> Any:
    """A fresh FP8CommState that travels in ``optimizer``'s state_dict, keyed by the optimizer's
    parameter indices. optimizer.pt is written by whatever saves the checkpoint (adapter_ckpt or the
    stock trainer) and read back before training resumes, so a resumed run quantizes with the
    scales the uninterrupted run had; restarting them at ``init_scale`` changed its gradients.
    (The save/load hooks are first-result hooks owned by the checkpoint writer, so they cannot
    carry a second plugin's file.)"""
    from perl_plugins.plugins.fp8.comm import FP8CommState

    comm = FP8CommState()

    def ids() -> dict[int, int]:  # torch's state_dict numbers parameters across groups, in order
        return {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}

    def save(_: Any, state_dict: dict[str, Any]) -> None:
        state_dict["fp8_comm"] = comm.state_dict(ids())

    def load(_: Any, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("fp8_comm")
        if saved is not None:  # a checkpoint written without fp8_comm starts from init_scale
            comm.load_state_dict(saved, {i: k for k, i in ids().items()})

    optimizer.register_state_dict_post_hook(save)
    optimizer.register_load_state_dict_pre_hook(load)
    return comm


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer that steps, under accelerate's and DeepSpeed's wrappers (each keeps it in ``.optimizer``)."""
    while getattr(optimizer, "optimizer", None) is not None and not isinstance(optimizer, fp8_optim.FP8AdamW):
        optimizer = optimizer.optimizer
    return optimizer


@hookimpl
def perl_on_train_begin(trainer: Any, model: Any, options: dict[str, Any]) -> None:
    optimizer = innermost_optimizer(trainer.optimizer)
    if not isinstance(optimizer, fp8_optim.FP8AdamW):
        raise PluginIncompatibleError(
            f"fp8: training was about to start with {type(trainer.optimizer).__name__}, not FP8AdamW."
        )
    # Under DeepSpeed ZeRO it steps this process's flat partitions, each holding pieces of many
    # tensors: every piece keeps its own scales, as the tensor would under DDP.
    for flat, pieces in partition_pieces(trainer):
        optimizer.set_segments(flat, pieces)
    logger.warning("fp8: %s", fp8_optim.describe(optimizer.summary()))
    if not options["fp8"].fp8_comm:
        return
    from torch.nn.parallel import DistributedDataParallel

    from perl_plugins.plugins.fp8.comm import register_fp8_comm_hook

    if not isinstance(model, DistributedDataParallel):
        raise PluginIncompatibleError(f"fp8_comm needs a DDP-wrapped model, got {type(model).__name__}.")
    # Built with the optimizer (perl_create_optimizer), so a resume has already restored its scales.
    register_fp8_comm_hook(model, perl_plugins.state(trainer)["fp8"])


@hookimpl
def perl_on_log(trainer: Any, logs: dict[str, float], options: dict[str, Any]) -> None:
    optimizer = innermost_optimizer(trainer.optimizer)
    if isinstance(optimizer, fp8_optim.FP8AdamW):
        logs["fp8/nonfinite_skips"] = optimizer.nonfinite_skips
    state = perl_plugins.state(trainer).get("fp8")
    if state is not None and state.bytes_fp32_equivalent:
        logs["fp8/comm_bytes_ratio"] = state.bytes_sent / state.bytes_fp32_equivalent
        logs["fp8/comm_scale"] = float(state.scale)


def __getattr__(name: str) -> Any:
    if name == "FP8AdamW":  # re-exported; importing it imports torch
        return fp8_optim.FP8AdamW
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
