"""FP8AdamW's CPU kernel (``adamw_cpu.cpp``): built with the system C++ compiler on first use, cached
under torch's extensions directory, called through ctypes.

No torch headers: the library builds in a few seconds (a torch C++ extension takes about a minute),
which a first step and a fresh CI run both feel. It is built for the machine it runs on
(``-march=native``); the cache key covers the source, the flags, the compiler and the CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.cpp_extension import get_default_build_root

SOURCE = Path(__file__).with_name("adamw_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
N_HP = 9

_lib: ctypes.CDLL | None = None


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be built or loaded."""


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler ({compiler!r}, from $CXX) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_id()]).encode()).hexdigest()[:16]
    out_dir = Path(get_default_build_root()) / "perl_plugins_fp8_adamw"
    library = out_dir / f"adamw_cpu_{key}.so"
    if not library.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name, then renamed: processes building at once never see half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode:
            os.unlink(tmp)
            raise KernelBuildError(f"{compiler} failed on {SOURCE.name}:\n{result.stderr[-3000:]}")
        os.replace(tmp, library)
    lib = ctypes.CDLL(str(library))
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    lib.fp8_adamw_step.restype = None
    lib.fp8_adamw_step.argtypes = [ctypes.c_int64, *[ptrs] * 4, *[ctypes.c_void_p] * 3, ptrs, *[ptrs] * 4]
    lib.fp8_adamw_step.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def load() -> ctypes.CDLL:
    """The built library (built on the first call); KernelBuildError when that fails."""
    global _lib
    if _lib is None:
        try:
            _lib = _build()
        except KernelBuildError:
            raise
        except Exception as e:
            raise KernelBuildError(f"{type(e).__name__}: {e}") from e
    return _lib


def _pointers(tensors: list[Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[0 if t is None else t.data_ptr() for t in tensors])


def step(
    p: list[Tensor],
    g: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    scales: list[tuple[Tensor, Tensor, Tensor, Tensor] | None],
    cuts: list[Tensor | None],
    hp: list[tuple[float, ...]],
) -> list[bool]:
    """One group's update, in place. Per parameter: contiguous fp32 ``p`` and ``g``; flat ``m``, ``v``
    fp32 (``scales`` None) or E4M3 / fp16 with ``scales`` = (m_scale, m_amax, v_scale, v_amax), one
    value per piece (0-d without pieces); ``cuts``: the pieces' int64 boundaries, or None; ``hp``:
    the nine hyper-parameters (see adamw_cpu.cpp). Returns whether each parameter was updated (a
    non-finite gradient leaves that parameter untouched)."""
    n = len(p)
    lib = load()
    fp8 = (ctypes.c_int32 * n)(*[s is not None for s in scales])
    pieces = (ctypes.c_int64 * n)(*[0 if c is None else c.numel() - 1 for c in cuts])
    numel = (ctypes.c_int64 * n)(*[t.numel() for t in p])
    hps = (ctypes.c_float * (N_HP * n))(*[x for h in hp for x in h])
    ok = (ctypes.c_int32 * n)()
    per_piece = [_pointers([None if s is None else s[k] for s in scales]) for k in range(4)]
    lib.fp8_adamw_step(
        n, _pointers(p), _pointers(g), _pointers(m), _pointers(v), numel, fp8, pieces, _pointers(cuts),
        *per_piece, hps, ok, torch.get_num_threads(),
    )  # fmt: skip
    return [bool(x) for x in ok]
