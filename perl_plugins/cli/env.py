"""``perl-plugins env``: what a bug report needs, like ``trl env`` / ``transformers env``: versions
of python and the libraries, the accelerator seen, and the plugins found with their source.

It answers at once: versions come from the installed distributions' metadata and the accelerator
from the system (``nvidia-smi``, ROCm's ``/dev/kfd``, Apple silicon); ``--torch`` also asks torch
what it sees (importing it takes seconds)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

LIBRARIES = ("perl-plugins", "torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "pluggy", "datasets")


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def accelerator() -> str:
    """The accelerator the system shows, without importing torch."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi:
        try:
            listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        gpus = [line.split(" (UUID")[0].split(": ", 1)[-1] for line in listing.splitlines() if line.startswith("GPU ")]
        if gpus:
            return f"{len(gpus)} x {', '.join(sorted(set(gpus)))} (nvidia-smi)"
    if os.path.exists("/dev/kfd"):
        return "AMD GPU (ROCm /dev/kfd)"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "Apple silicon (MPS)"
    return f"none: CPU only ({os.cpu_count()} cores)"


def torch_accelerator() -> str:
    """The accelerator torch sees: CUDA/ROCm devices with their names, Apple MPS, or the CPU."""
    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        backend = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"{torch.cuda.device_count()} x {', '.join(names)} ({backend})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple MPS"
    return f"CPU only ({torch.get_num_threads()} threads)"


def collect(ask_torch: bool = False) -> dict[str, Any]:
    from perl_plugins.host.registry import installed_plugins

    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **{name: _version(name) for name in LIBRARIES},
        "accelerator": accelerator(),
    }
    if ask_torch:
        info["accelerator seen by torch"] = torch_accelerator()
    info["plugins"] = {name: spec.source for name, spec in installed_plugins().items()}
    return info


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="perl-plugins env", description="Print versions, the accelerator and the plugins, for bug reports."
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--torch", action="store_true", help="also ask torch which accelerator it sees (slower)")
    args = parser.parse_args(list(argv))
    info = collect(ask_torch=args.torch)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("Copy-paste this into your bug report:\n")
    for key, value in info.items():
        if key == "plugins":
            value = ", ".join(f"{name} ({source})" for name, source in value.items()) or "none"
        print(f"- {key}: {value}")
    return 0
