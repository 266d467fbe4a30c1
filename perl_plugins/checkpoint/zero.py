"""Full, world-size-free tensors out of DeepSpeed ZeRO partitions (for ``adapter_ckpt``).

ZeRO-1/2 give each process a slice of one flat fp32 tensor per parameter group, and the optimizer
steps those slices; ZeRO-3 also partitions the parameters themselves (and splits groups into
sub-groups). These helpers rebuild, per model parameter, its full value and its full optimizer
state. They are collectives: every process calls them, with the same arguments, in the same order.
"""

from __future__ import annotations

from typing import Any

from perl_plugins.lazy import lazy_import
from perl_plugins.models.gather import gathered

# Imported on first use: plugins import this module while they are only listed.
torch = lazy_import("torch")
nn = lazy_import("torch.nn")

__all__ = ["zero_stage", "engine_name", "full_values", "partition_pieces", "portable_optimizer_state"]


def zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage a DeepSpeed trainer runs (0-3), or None without DeepSpeed."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage)


def engine_name(trainer: Any) -> str:
    """How the run is distributed: ``deepspeed_zero<N>``, ``ddp`` (several processes) or ``single``."""
    stage = zero_stage(trainer)
    if stage is not None:
        return f"deepspeed_zero{stage}"
    return "ddp" if trainer.args.world_size > 1 else "single"


def _is_adapter_name(name: str) -> bool:
    return any(s == "modules_to_save" or s.startswith("lora_") for s in name.split("."))


def full_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of what a checkpoint saves, by parameter name: every trainable parameter (under
    ZeRO, its fp32 master copy, which the optimizer updates) and every frozen adapter tensor (e.g. a
    frozen reward adapter), gathered from ZeRO-3 partitions."""
    from deepspeed.utils import safe_get_full_fp32_param

    values: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)  # None without a ZeRO optimizer (stage 0)
            with gathered([param] if master is None else []):
                values[name] = (param if master is None else master).detach().clone()
        elif _is_adapter_name(name):
            with gathered([param]):
                values[name] = param.detach().clone()
    return values


# ---------------------------------------------------------------- optimizer state


def partition_pieces(trainer: Any) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """For each flat fp32 partition this process's optimizer steps, the ``(start, numel)`` of every
    model tensor's fragment in it; empty without a ZeRO optimizer. Local: no communication."""
    zero_opt = getattr(trainer.model_wrapped, "optimizer", None)
    if zero_stage(trainer) == 3 and hasattr(zero_opt, "grad_position"):
        flats = zero_opt.fp32_partitioned_groups_flat
        pieces: list[list[tuple[int, int]]] = [[] for _ in flats]
        for group_index, offset, numel in zero_opt.grad_position.values():
            if numel:
                pieces[group_index].append((offset, numel))
        return list(zip(flats, pieces))
    if not zero_stage(trainer) or not hasattr(zero_opt, "single_partition_of_fp32_groups"):
        return []
    out = []
    for flat, group in zip(zero_opt.single_partition_of_fp32_groups, zero_opt.bit16_groups):
        fragments = [getattr(p, "_hp_mapping", None) for p in group]  # None: none of p on this process
        out.append((flat, [(f.hp_fragment_address.start, f.hp_fragment_address.numel) for f in fragments if f]))
    return out


def _flat_state(basic: torch.optim.Optimizer, flat: torch.Tensor) -> dict[str, Any]:
    """The optimizer's state for one flat ZeRO partition, tensors in full precision."""
    if hasattr(basic, "dequantized_state"):  # FP8AdamW stores scaled fp8/fp16 moments
        return basic.dequantized_state(flat)
    return dict(basic.state.get(flat, {}))


def _is_per_value(value: Any, flat: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() == 1 and value.numel() == flat.numel() and flat.numel() > 0


def _gather_stage12(zero_opt: Any, param: torch.Tensor, group_index: int, state: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    flat = zero_opt.single_partition_of_fp32_groups[group_index]
    mapping = getattr(param, "_hp_mapping", None)  # None where this process holds none of param
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not _is_per_value(value, flat):
            out[key] = value
            continue
        full = torch.zeros(param.numel(), dtype=torch.float32, device=flat.device)
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            full.narrow(0, lp.start, lp.numel).copy_(value.narrow(0, hp.start, hp.numel))
        dist.all_reduce(full, group=zero_opt.dp_process_group)  # fragments are disjoint: the sum assembles
        out[key] = full
    return out


def _gather_stage3(zero_opt: Any, param: torch.Tensor, states: list[dict[str, Any]]) -> dict[str, Any]:
    group_index, offset, numel = zero_opt.grad_position[zero_opt.get_param_id(param)]
    flat = zero_opt.fp32_partitioned_groups_flat[group_index]
    out: dict[str, Any] = {}
    for key, value in states[group_index].items():
        if _is_per_value(value, flat):
            out[key] = zero_opt._fp32_state_allgather(param, value.narrow(0, offset, numel)).flatten().float()
        else:
            out[key] = value
    return out


def _set_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, values: dict[str, Any]) -> None:
    if not values:
        return
    if hasattr(optimizer, "load_dequantized_state"):
        optimizer.load_dequantized_state(param, values)
        return
    optimizer.state[param] = {
        k: v.view_as(param).to(param.dtype) if torch.is_tensor(v) and v.numel() == param.numel() and v.dim() else v
        for k, v in values.items()
    }


def portable_optimizer_state(trainer: Any) -> dict[str, Any]:
    """The state dict of the optimizer this trainer builds without DeepSpeed, holding the
    ZeRO-partitioned optimizer state gathered per parameter: a ``optimizer.pt`` that a run with
    any number of processes and no DeepSpeed loads as its own. FP8AdamW states are dequantized to
    gather and requantized per parameter (fresh scales), so they round-trip up to that rounding."""
    zero_opt = trainer.model_wrapped.optimizer
    basic = zero_opt.optimizer
    stage = zero_stage(trainer)
    needed = ["fp32_partitioned_groups_flat", "grad_position"]
    if stage != 3:
        needed = ["single_partition_of_fp32_groups", "bit16_groups"]
    if not all(hasattr(zero_opt, name) for name in needed):
        raise RuntimeError(
            f"adapter_ckpt gathers optimizer state from DeepSpeed 0.19's ZeRO optimizers, but this "
            f"{type(zero_opt).__name__} lacks {needed}: set adapter_ckpt_portable_optimizer=false (the checkpoint "
            "then resumes only under DeepSpeed at the same world size), or use deepspeed 0.19."
        )
    model = trainer.model
    stock, trainer.optimizer = trainer.optimizer, None
    try:  # the exact optimizer (class, groups, hyper-parameters) a run without DeepSpeed gets
        fresh = trainer.create_optimizer(model)
    finally:
        trainer.optimizer = stock
    if stage == 3:
        states = [_flat_state(basic, flat) for flat in zero_opt.fp32_partitioned_groups_flat]
    else:
        group_of = {id(p): i for i, group in enumerate(zero_opt.bit16_groups) for p in group}
        states = [_flat_state(basic, flat) for flat in zero_opt.single_partition_of_fp32_groups]
    for group in fresh.param_groups:
        stand_ins = []
        for param in group["params"]:
            if stage == 3:
                values = _gather_stage3(zero_opt, param, states)
                shape = param.ds_shape
            else:
                index = group_of[id(param)]
                values = _gather_stage12(zero_opt, param, index, states[index])
                shape = param.shape
            stand_in = torch.zeros(shape, dtype=param.dtype)  # state_dict() keys by position, not identity
            _set_state(fresh, stand_in, {k: v.cpu() if torch.is_tensor(v) else v for k, v in values.items()})
            stand_ins.append(stand_in)
        group["params"] = stand_ins
    return fresh.state_dict()
