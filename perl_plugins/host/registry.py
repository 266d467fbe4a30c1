"""Finding plugins: the built-ins (listed in code), third-party entry points, local files, environment lists."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from perl_plugins.errors import PluginLoadError, UnknownPluginError

ENTRY_POINT_GROUP = "perl_plugins"
ENV_DEFAULT = "PERL_PLUGINS"
ENV_DISABLE = "PERL_PLUGINS_DISABLE"
# name -> module. In code rather than in entry points so that a source checkout that was never
# pip-installed has them too. Nothing imports one until it is asked for by name.
BUILTIN: tuple[tuple[str, str], ...] = (
    ("lora", "perl_plugins.plugins.lora"),
    ("grm", "perl_plugins.plugins.grm"),
    ("fp8", "perl_plugins.plugins.fp8"),
    ("adapter_ckpt", "perl_plugins.plugins.adapter_ckpt"),
    ("rrhf", "perl_plugins.plugins.rrhf"),
)


@dataclass(frozen=True)
class PluginSpec:
    """A plugin found but not necessarily imported yet."""

    name: str
    source: str  # "builtin", "entry point (<distribution>)" or "file (<path>)"
    target: str  # module path of an entry point, or a file path


@dataclass(frozen=True)
class LoadedPlugin:
    name: str
    source: str
    module: Any


def installed_plugins() -> dict[str, PluginSpec]:
    """The built-in plugins, plus third-party plugins registered under the ``perl_plugins`` entry-point group."""
    found = {name: PluginSpec(name, "builtin", target) for name, target in BUILTIN}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        if dist.replace("_", "-").lower() == "perl-plugins":
            continue  # an install made before BUILTIN existed declares the built-ins as entry points too
        if ep.name in found:
            warnings.warn(
                f"perl-plugins: ignoring entry point {ep.name!r} of {dist} ({ep.value}): the name is taken by "
                f"{found[ep.name].target!r} ({found[ep.name].source}); rename the plugin in {dist}'s entry points.",
                UserWarning,
                stacklevel=2,
            )
            continue
        found[ep.name] = PluginSpec(ep.name, f"entry point ({dist})", ep.value)
    return dict(sorted(found.items()))


def split_names(plugins: str | Sequence[Any] | None) -> list[Any]:
    """Normalize ``"a,b"`` / ``["a", "b"]`` / ``None`` into a list, applying the environment.

    ``None`` takes the default list from ``$PERL_PLUGINS``; names in ``$PERL_PLUGINS_DISABLE``
    are dropped from whatever list results (plugin objects passed directly are kept).
    """
    explicit = plugins is not None
    if plugins is None:
        plugins = os.environ.get(ENV_DEFAULT, "")
    if isinstance(plugins, str):
        plugins = plugins.split(",")
    elif isinstance(plugins, os.PathLike):
        plugins = [plugins]
    # Paths (pathlib) name local plugin files just like strings do.
    names = [os.fspath(p).strip() if isinstance(p, (str, os.PathLike)) else p for p in plugins]
    names = [p for p in names if p != ""]
    disabled = {n.strip() for n in os.environ.get(ENV_DISABLE, "").split(",") if n.strip()}
    blocked = [p for p in names if isinstance(p, str) and short_name(p) in disabled]
    if blocked and explicit:  # asked for by name: dropping it in silence would look like a plugin that does nothing
        warnings.warn(
            f"perl-plugins: not attaching {blocked}: ${ENV_DISABLE}={os.environ[ENV_DISABLE]!r} blocks them.",
            UserWarning,
            stacklevel=3,
        )
    return [p for p in names if p not in blocked]


def is_local_file(name: str) -> bool:
    return name.endswith(".py") or os.sep in name or "/" in name


def short_name(name: str) -> str:
    """A plugin's name: the entry-point name, or a local file's stem."""
    return Path(name).stem if is_local_file(name) else name


def load(name: str) -> LoadedPlugin:
    """Import one plugin by entry-point name or local file path, with errors naming the culprit."""
    if is_local_file(name):
        return _load_file(Path(name))
    specs = installed_plugins()
    if name not in specs:
        close = difflib.get_close_matches(name, list(specs), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownPluginError(
            f"Unknown plugin {name!r}.{hint} Available plugins: {', '.join(specs) or '(none)'}; "
            "or give the path of a local plugin file (e.g. ./hooks/my_plugin.py)."
        )
    spec = specs[name]
    try:
        module = importlib.import_module(spec.target)
    except Exception as exc:  # any import failure is the plugin's, report it as such
        raise PluginLoadError(f"Plugin {name!r} ({spec.target}) failed to import: {exc!r}") from exc
    return LoadedPlugin(name, spec.source, module)


def _load_file(path: Path) -> LoadedPlugin:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UnknownPluginError(f"Local plugin file {str(path)!r} does not exist.")
    # A stable, unique module name lets the same file be attached to several trainers.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    module_name = f"perl_plugins_local_{path.stem}_{digest}"
    if module_name in sys.modules:
        return LoadedPlugin(path.stem, f"file ({path})", sys.modules[module_name])
    spec = importlib.util.spec_from_file_location(module_name, path)
    module: ModuleType = importlib.util.module_from_spec(spec)
    # Registered before executing, as importlib does: dataclasses (string annotations) and
    # typing.get_type_hints look the module up in sys.modules while its body runs.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginLoadError(f"Local plugin file {str(path)!r} failed to import: {exc!r}") from exc
    return LoadedPlugin(path.stem, f"file ({path})", module)
