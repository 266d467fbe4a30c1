"""Watching hook calls through pluggy's own monitoring (``PluginManager.add_hookcall_monitoring``).

``$PERL_PLUGINS_TRACE=1`` prints one line per hook call to stderr: the hook, the plugins it
reached in the order they ran, the arguments summarized (types and shapes, never tensor values;
``options`` left out, every hook gets it), the result and the time it took. Tests observe hook
calls the same way (:func:`add_monitor`), so they see exactly what pluggy sees.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pluggy

ENV_TRACE = "PERL_PLUGINS_TRACE"
PREFIX = "perl-plugins trace: "

# pluggy's monitoring signatures
Before = Callable[[str, Sequence[pluggy.HookImpl], Mapping[str, Any]], None]
After = Callable[[pluggy.Result, str, Sequence[pluggy.HookImpl], Mapping[str, Any]], None]

_monitors: list[tuple[Before, After]] = []


def add_monitor(before: Before, after: After) -> Callable[[], None]:
    """Monitor every hook call of the plugin sets created from now on; returns the undo function
    (plugin sets created later are no longer monitored)."""
    pair = (before, after)
    _monitors.append(pair)
    return lambda: _monitors.remove(pair)


def tracing_enabled() -> bool:
    return os.environ.get(ENV_TRACE, "").strip().lower() not in ("", "0", "false", "no", "off")


def install(pm: pluggy.PluginManager) -> None:
    """Add the trace printer (when asked for) and the registered monitors to a fresh manager."""
    if tracing_enabled():
        tracer = HookTracer()
        pm.add_hookcall_monitoring(tracer.before, tracer.after)
    for before, after in _monitors:
        pm.add_hookcall_monitoring(before, after)


class HookTracer:
    """Prints each hook call when it returns; a call made inside another hook is indented."""

    def __init__(self) -> None:
        self._local = threading.local()  # start times of the calls in progress, per thread

    def _starts(self) -> list[float]:
        if not hasattr(self._local, "starts"):
            self._local.starts = []
        return self._local.starts

    def before(self, hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        self._starts().append(time.perf_counter())

    def after(
        self, outcome: pluggy.Result, hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
    ) -> None:
        starts = self._starts()
        elapsed_ms = (time.perf_counter() - starts.pop()) * 1000
        plugins = ", ".join(impl.plugin_name for impl in reversed(hook_impls))  # pluggy calls the last one first
        args = ", ".join(f"{name}={summarize(value)}" for name, value in kwargs.items() if name != "options")
        error = outcome.exception
        result = f"raised {type(error).__name__}: {error}" if error is not None else summarize(outcome.get_result())
        indent = "  " * len(starts)
        print(f"{PREFIX}{indent}{hook_name} [{plugins}] ({args}) -> {result} ({elapsed_ms:.3f} ms)", file=sys.stderr)


def summarize(value: Any, nested: bool = False) -> str:
    """A short description of a hook argument or result: scalars and short strings as they are,
    tensors by shape and dtype, containers by length (a short list item by item), objects by type."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:77]) + "..."
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:  # a tensor or an array, told apart without importing torch
        return f"{type(value).__name__}{tuple(shape)} {dtype}"
    if isinstance(value, (list, tuple)) and not nested and len(value) <= 3:  # e.g. the results of one plugin
        return "[" + ", ".join(summarize(item, nested=True) for item in value) + "]"
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"{type(value).__name__}[{len(value)}]"
    return type(value).__name__
