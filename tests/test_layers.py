"""Private names of the libraries the trainers are built on stay in one compat module.

Rule 3 of the package layout: private names of torch / transformers / trl / DeepSpeed (and of
accelerate and peft, which the trainers run on) appear only in ``perl_plugins/host/trainer_compat.py``
(the trainer methods the host wraps, the private steps of a checkpoint save) and in
``perl_plugins/checkpoint/zero.py`` (DeepSpeed ZeRO internals), so a library upgrade is checked
against those two files. This test reads every ``.py`` under ``perl_plugins/``, ``recipes/`` and
``hooks/`` (the AST, not the text: comments and docstrings may name private methods) and flags:

- ``import lib._x`` / ``from lib._x import y`` / ``from lib.x import _y`` for those libraries, and
  the same module names given as strings to ``lazy_import`` or ``importlib.import_module``;
- ``obj._name`` (one leading underscore, not a dunder) on any object but ``self``, ``cls`` and the
  project's own modules (names bound by ``import perl_plugins...``, ``from perl_plugins... import
  m``, ``from recipes... import m`` or a relative import): the objects the package handles that are
  not its own (trainers, models, optimizers, accelerators, configs, tokenizers) come from the
  libraries, and the project's own classes keep their private attributes to themselves (``self``);
- ``getattr`` / ``setattr`` / ``hasattr`` / ``delattr`` with a constant ``"_name"`` on such an object;
- keyword arguments named ``_name`` (private parameters, e.g. of ``transformers.utils.cached_file``).

Plain strings (dict keys such as config.json's ``"_name_or_path"``) are data, not names: not flagged.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("perl_plugins", "recipes", "hooks")
LIBRARIES = {"torch", "transformers", "trl", "deepspeed", "accelerate", "peft"}
PROJECT = {"perl_plugins", "recipes"}
ALLOWED = {
    "perl_plugins/host/trainer_compat.py",  # the compat module
    "perl_plugins/checkpoint/zero.py",  # DeepSpeed ZeRO internals
}
ATTR_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr"}
IMPORT_FUNCTIONS = {"lazy_import", "import_module"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_library_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] in LIBRARIES and any(_private(part) for part in parts)


def _project_aliases(tree: ast.Module) -> set[str]:
    """Names the file binds to the project's own modules (or to anything imported from them)."""
    aliases = {"self", "cls"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT:
                    aliases.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PROJECT):
            aliases.update(alias.asname or alias.name for alias in node.names)
    return aliases


def private_uses(source: str, path: str = "<source>") -> list[str]:
    """``path:line: what`` for every private library name ``source`` uses (see the module docstring)."""
    tree = ast.parse(source, filename=path)
    own = _project_aliases(tree)
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{path}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _private_library_module(alias.name):
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            top = node.module.split(".")[0]
            private_module = _private_library_module(node.module)
            names = [alias.name for alias in node.names if private_module or _private(alias.name)]
            if top in LIBRARIES and names:
                flag(node, f"from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in own):
                flag(node, f"{ast.unparse(node.value)}.{node.attr}")
        elif isinstance(node, ast.Call):
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            constants = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if func in ATTR_FUNCTIONS and len(node.args) > 1:
                target, name = node.args[0], node.args[1]
                mine = isinstance(target, ast.Name) and target.id in own
                if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value) and not mine:
                    flag(node, f"{func}({ast.unparse(target)}, {name.value!r})")
            if func in IMPORT_FUNCTIONS and constants and _private_library_module(constants[0]):
                flag(node, f"{func}({constants[0]!r})")
            for keyword in node.keywords:
                if keyword.arg and _private(keyword.arg):
                    flag(keyword, f"{ast.unparse(node.func)}(..., {keyword.arg}=...)")
    return sorted(found, key=lambda line: int(line.split(":")[1]))


def _scanned_files() -> list[Path]:
    files = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in ALLOWED:
                files.append(path)
    return files


def test_private_library_names_only_in_the_compat_modules():
    files = _scanned_files()
    assert len(files) > 40  # the scan really reads the package, the recipes and the hook files
    found = [line for path in files for line in private_uses(path.read_text(), path.relative_to(ROOT).as_posix())]
    assert not found, (
        "Private trl/transformers/torch/DeepSpeed names outside perl_plugins/host/trainer_compat.py and "
        "perl_plugins/checkpoint/zero.py (move them into trainer_compat, exposed through the public API):\n"
        + "\n".join(found)
    )


@pytest.mark.parametrize(
    "source",
    [
        "trainer._save_checkpoint = wrapper",
        "trainer._set_signature_columns_if_needed()",
        "x = super()._prepare_inputs(inputs)",
        "model.config._name_or_path",
        "getattr(base.config, '_name_or_path', '')",
        "setattr(trainer, '_load_best_model', f)",
        "import torch._dynamo",
        "from torch._inductor.cpp_builder import get_cpp_compiler",
        "from transformers.trainer import _is_peft_model",
        "torch = lazy_import('torch._dynamo')",
        "cached_file(path, name, _raise_exceptions_for_missing_entries=False)",
        "trainer.accelerator._models",
    ],
)
def test_rule_flags_private_library_names(source):
    assert private_uses(source), source


@pytest.mark.parametrize(
    "source",
    [
        "self._terms[name] = value",
        "cls._registry.clear()",
        "from perl_plugins.models import embedded\nembedded._materialize(path)",
        "import perl_plugins.host.attach as attach\nattach._install(trainer, plugins)",
        "from perl_plugins.models.embedded import _local_main_process_first",
        "from . import store\nstore._tmp_name(path)",
        "raw_config.get('_name_or_path')",
        "model.config.name_or_path",
        "trainer.__class__.__name__",
        "getattr(trainer, 'perl_plugins', None)",
    ],
)
def test_rule_leaves_the_projects_own_names(source):
    assert not private_uses(source), private_uses(source)


# Attributes the stock trainers define themselves, which plugins may replace (the data, a model).
STOCK_TRAINER_ATTRIBUTES = {"train_dataset", "eval_dataset", "data_collator", "model", "ref_model", "optimizer"}


def _new_attribute(owner: ast.expr, name: str) -> bool:
    if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
        return False
    if isinstance(owner, ast.Name) and owner.id == "trainer":
        return name not in STOCK_TRAINER_ATTRIBUTES
    return name.startswith("perl_")


def new_trainer_attributes(source: str, path: str = "<source>") -> list[str]:
    """``path:line`` of every ``obj.perl_x = ...`` / ``setattr(obj, "perl_x", ...)`` and every new
    ``trainer.x = ...`` (``x`` not a stock trainer attribute): plugin state set as a new attribute
    of a trainer or model instead of in ``perl_plugins.state(trainer)``."""
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets += [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and _new_attribute(target.value, target.attr):
                found.append(f"{path}:{node.lineno}: {ast.unparse(target)} = ...")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            name = node.args[1] if len(node.args) > 1 else None
            if (
                isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and _new_attribute(node.args[0], name.value)
            ):
                found.append(f"{path}:{node.lineno}: setattr({ast.unparse(node.args[0])}, {name.value!r})")
    return sorted(found, key=lambda line: int(line.split(":")[1]))


def test_plugin_state_lives_in_state_not_in_new_attributes():
    files = [
        path for top in ("perl_plugins/plugins", "recipes", "hooks") for path in sorted((ROOT / top).rglob("*.py"))
    ]
    found = [
        line for path in files for line in new_trainer_attributes(path.read_text(), path.relative_to(ROOT).as_posix())
    ]
    assert not found, "Plugin state belongs in perl_plugins.state(trainer)[plugin]:\n" + "\n".join(found)
    flagged = "trainer.perl_grm = s\nsetattr(model, 'perl_x', 1)\ntrainer.monitor = m\nunwrap(model).perl_y = 1"
    assert new_trainer_attributes(flagged) == [
        "<source>:1: trainer.perl_grm = ...",
        "<source>:2: setattr(model, 'perl_x')",
        "<source>:3: trainer.monitor = ...",
        "<source>:4: unwrap(model).perl_y = ...",
    ]
    allowed = "self.perl_cache = {}\nstate(trainer)['grm'] = s\ntrainer.train_dataset = d\nbase.lm_head = head"
    assert not new_trainer_attributes(allowed)
