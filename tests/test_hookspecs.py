"""Hookspec documentation, and the conftest check that every hookspec is exercised by the suite."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import HookRecorder, hookspec_names, pytest_sessionfinish, ran_whole_suite

from perl_plugins import hookimpl, hookspecs
from perl_plugins.host.plugin_set import PluginSet

# The hooks the host was written with; more may be added (each then needs docs and a test).
CORE = {
    "perl_plugin_options",
    "perl_check_trainer",
    "perl_configure",
    "perl_prepare_model",
    "perl_compute_loss",
    "perl_create_optimizer",
    "perl_save_checkpoint",
    "perl_load_checkpoint",
    "perl_on_step_end",
    "perl_on_log",
    "perl_shape_rewards",
}


def test_hookspec_names():
    names = hookspec_names()
    assert CORE <= set(names)
    assert all(name.startswith("perl_") for name in names)


@pytest.mark.parametrize("name", hookspec_names())
def test_hookspec_documents_when_it_fires_and_what_it_returns(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    assert "Fires:" in doc, f"{name}: docstring must say when it fires ('Fires: ...')"
    assert "Returns:" in doc, f"{name}: docstring must say what it returns ('Returns: ...')"
    assert "options" in inspect.signature(spec).parameters or name == "perl_plugin_options"


class _Probe:
    PLUGIN_NAME = "probe"

    @hookimpl
    def perl_on_step_end(self):
        pass

    @hookimpl
    def perl_shape_rewards(self, rewards):
        return rewards


def test_recorder_records_hooks_fired_with_an_implementation(hook_recorder, monkeypatch):
    monkeypatch.setattr(hook_recorder, "called", set())
    plugins = PluginSet.from_names([_Probe()])
    plugins.call("perl_on_step_end", trainer=None, state=None, control=None)
    plugins.call("perl_on_log", trainer=None, logs={}, state=None, control=None)  # nobody implements it
    assert plugins.chain("perl_shape_rewards", "rewards", 1.0, trainer=None, prompts=[], completions=[]) == 1.0
    assert hook_recorder.called == {"perl_on_step_end", "perl_shape_rewards"}

    PluginSet.from_names([Path(__file__).parent / "plugins_for_tests" / "options_only.py"])
    assert "perl_plugin_options" in hook_recorder.called
    assert "perl_on_log" in hook_recorder.missing() and "perl_on_step_end" not in hook_recorder.missing()


def _session(
    tmp_path: Path, files: list[str], keyword: str = "", args: tuple[str, ...] = (), collect_only: bool = False
) -> SimpleNamespace:
    config = SimpleNamespace(
        option=SimpleNamespace(keyword=keyword, markexpr="", collectonly=collect_only),
        args=list(args),
        pluginmanager=SimpleNamespace(get_plugin=lambda name: None),
    )
    items = [SimpleNamespace(path=tmp_path / name) for name in files]
    return SimpleNamespace(config=config, items=items, exitstatus=0)


def test_ran_whole_suite(tmp_path):
    for name in ("test_a.py", "test_b.py"):
        (tmp_path / name).touch()
    every = {tmp_path / "test_a.py", tmp_path / "test_b.py"}
    whole = _session(tmp_path, [])
    assert ran_whole_suite(whole.config, every, 0, tmp_path)
    assert not ran_whole_suite(whole.config, {tmp_path / "test_a.py"}, 0, tmp_path)  # one file only
    assert not ran_whole_suite(whole.config, every, 2, tmp_path)  # deselected items
    assert not ran_whole_suite(_session(tmp_path, [], keyword="attach").config, every, 0, tmp_path)  # -k
    assert not ran_whole_suite(_session(tmp_path, [], collect_only=True).config, every, 0, tmp_path)
    assert not ran_whole_suite(_session(tmp_path, [], args=("tests/test_a.py::test_x",)).config, every, 0, tmp_path)


def test_sessionfinish_fails_a_full_run_with_unexercised_hooks(monkeypatch, capsys):
    import conftest

    tests_dir = Path(conftest.__file__).parent
    files = [p.relative_to(tests_dir) for p in tests_dir.rglob("test_*.py")]
    recorder = HookRecorder()
    monkeypatch.setattr(conftest, "HOOKS", recorder)
    monkeypatch.setattr(conftest, "_deselected", 0)

    recorder.called = set(hookspec_names()) - {"perl_on_log"}
    full = _session(tests_dir, [str(f) for f in files])
    pytest_sessionfinish(full, 0)
    assert full.exitstatus == 1
    assert "hookspecs never exercised by the test suite: perl_on_log" in capsys.readouterr().out

    partial = _session(tests_dir, [str(f) for f in files], keyword="attach")
    pytest_sessionfinish(partial, 0)
    assert partial.exitstatus == 0

    recorder.called = set(hookspec_names())
    complete = _session(tests_dir, [str(f) for f in files])
    pytest_sessionfinish(complete, 0)
    assert complete.exitstatus == 0


# ---------------------------------------------------------------- import cost


@pytest.mark.parametrize("module", ["perl_plugins.hookspecs", "perl_plugins"])
def test_importing_the_contract_imports_no_torch(module):
    """Plugin authors, ``perl-plugins --help`` and type checkers import these without paying for torch:
    the hookspecs' real types live under ``TYPE_CHECKING``."""
    heavy = ("torch", "transformers", "trl", "peft")
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
