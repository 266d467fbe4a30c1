"""Training settings for the machine at hand: without a GPU (or another accelerator) trl's configs
default to bf16 on an accelerator and stop with "Your setup doesn't support bf16/gpu"; the embedded
default exists to run offline on CPU, so the CLI and the recipes pick CPU settings and say so."""

from __future__ import annotations

import logging
from collections.abc import Collection

logger = logging.getLogger("perl_plugins")
_said: set[str] = set()  # one log line per process, however many stages ask


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, ROCm, XPU, MPS...)."""
    import torch

    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def cpu_settings(given: Collection[str] = ()) -> dict[str, bool]:
    """Training-argument overrides for a machine without an accelerator: ``use_cpu=True`` and
    ``bf16=False`` (fp32), except those the user set (``given`` names the keys they set: theirs
    win); empty with an accelerator. Logs one line when it chooses anything."""
    if has_accelerator():
        return {}
    chosen: dict[str, bool] = {}
    if "use_cpu" not in given:
        chosen["use_cpu"] = True
    if not {"bf16", "fp16"} & set(given):
        chosen["bf16"] = False
    flags = " ".join(f"--{key} {str(value).lower()}" for key, value in chosen.items())
    if chosen and flags not in _said:
        _said.add(flags)
        logger.warning(
            "perl-plugins: no GPU or other accelerator found: training on CPU (%s); "
            "set --use_cpu / --bf16 yourself to choose otherwise.",
            flags,
        )
    return chosen
