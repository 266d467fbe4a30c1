"""Every hook call goes through pluggy, so pluggy's monitoring sees it: ``$PERL_PLUGINS_TRACE=1``
prints each call to stderr, and monitors (the conftest hook-coverage check) observe them."""

from __future__ import annotations

import re

import pytest
import torch

from perl_plugins import attach, hookimpl
from perl_plugins.host.plugin_set import PluginSet
from perl_plugins.host.tracing import ENV_TRACE, add_monitor, summarize

# One trace line: "perl-plugins trace: <indent><hook> [<plugins>] (<args>) -> <result> (<ms> ms)"
LINE = re.compile(
    r"^perl-plugins trace: (?P<indent> *)(?P<hook>\w+) \[(?P<plugins>[^]]*)\] \((?P<args>.*)\) -> (?P<result>.*) \((?P<ms>\d+\.\d+) ms\)$"
)


class Tag:
    """Appends its name to the rewards it is given, and declares one option."""

    def __init__(self, name: str) -> None:
        self.PLUGIN_NAME = name

    @hookimpl
    def perl_shape_rewards(self, rewards):
        return rewards + [self.PLUGIN_NAME]

    @hookimpl
    def perl_on_step_end(self, state):
        state.append(self.PLUGIN_NAME)


class Keeps:
    """A chained implementation that returns None: the value passes through unchanged."""

    PLUGIN_NAME = "keeps"

    @hookimpl
    def perl_shape_rewards(self, rewards):
        return None


def trace_lines(err: str) -> list[re.Match]:
    lines = [line for line in err.splitlines() if line.startswith("perl-plugins trace:")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return matches


@pytest.fixture
def monitored(monkeypatch):
    """(hook name, plugin names) of every hook call of plugin sets created while the test runs."""
    calls: list[tuple[str, list[str]]] = []

    def before(hook_name, hook_impls, kwargs):
        calls.append((hook_name, [impl.plugin_name for impl in hook_impls]))

    undo = add_monitor(before, lambda outcome, hook_name, hook_impls, kwargs: None)
    yield calls
    undo()


def test_chained_hook_calls_each_plugin_through_pluggy(monitored):
    plugins = PluginSet.from_names([Tag("a"), Keeps(), Tag("b")])
    chained = plugins.chain("perl_shape_rewards", "rewards", [], trainer=None, prompts=[], completions=[])
    assert chained == ["a", "b"]
    assert monitored == [
        ("perl_shape_rewards", ["a"]),
        ("perl_shape_rewards", ["keeps"]),
        ("perl_shape_rewards", ["b"]),
    ]


def test_option_collection_goes_through_pluggy(monitored, plugin_file):
    PluginSet.from_names([plugin_file("options_only"), Tag("a")])
    assert monitored == [("perl_plugin_options", ["options_only"])]


def test_monitor_stops_after_undo():
    calls = []
    undo = add_monitor(lambda name, impls, kwargs: calls.append(name), lambda *args: None)
    undo()
    PluginSet.from_names([Tag("a")]).call("perl_on_step_end", trainer=None, state=[], control=None)
    assert calls == []


def test_trace_shows_each_call_of_a_chained_hook(monkeypatch, capsys):
    monkeypatch.setenv(ENV_TRACE, "1")
    plugins = PluginSet.from_names([Tag("a"), Keeps(), Tag("b")])
    plugins.chain("perl_shape_rewards", "rewards", [], trainer=None, prompts=["p"], completions=["c"])
    plugins.call("perl_on_step_end", trainer=None, state=[], control=None)

    lines = trace_lines(capsys.readouterr().err)
    assert [(m["hook"], m["plugins"]) for m in lines] == [
        ("perl_shape_rewards", "a"),
        ("perl_shape_rewards", "keeps"),
        ("perl_shape_rewards", "b"),
        ("perl_on_step_end", "a, b"),  # one pluggy call, plugins in the order they run
    ]
    assert lines[0]["args"] == "trainer=None, prompts=['p'], completions=['c'], rewards=[]"  # options left out
    assert lines[1]["args"].endswith("rewards=['a']")  # each link sees the previous result
    assert lines[2]["args"].endswith("rewards=['a']") and lines[2]["result"] == "[list[2]]"
    assert lines[1]["result"] == "[]"  # pluggy drops None results
    assert all(m["indent"] == "" and float(m["ms"]) >= 0 for m in lines)


def test_trace_is_off_unless_asked(monkeypatch, capsys):
    monkeypatch.setenv(ENV_TRACE, "0")
    PluginSet.from_names([Tag("a")]).call("perl_on_step_end", trainer=None, state=[], control=None)
    monkeypatch.delenv(ENV_TRACE)
    PluginSet.from_names([Tag("a")]).call("perl_on_step_end", trainer=None, state=[], control=None)
    assert "perl-plugins trace" not in capsys.readouterr().err


class Fails:
    PLUGIN_NAME = "fails"

    @hookimpl
    def perl_on_step_end(self):
        raise RuntimeError("boom")


def test_trace_shows_a_failing_call_and_the_error_still_propagates(monkeypatch, capsys):
    monkeypatch.setenv(ENV_TRACE, "1")
    plugins = PluginSet.from_names([Fails()])
    with pytest.raises(RuntimeError, match="boom"):
        plugins.call("perl_on_step_end", trainer=None, state=None, control=None)
    (line,) = trace_lines(capsys.readouterr().err)
    assert line["hook"] == "perl_on_step_end" and line["result"] == "raised RuntimeError: boom"


def test_summaries_name_shapes_not_values():
    assert summarize(torch.zeros(4, 2)) == "Tensor(4, 2) torch.float32"
    assert summarize(torch.nn.Linear(2, 2)) == "Linear"
    assert summarize(list(range(10))) == "list[10]"
    assert summarize({"a": 1}) == "dict[1]"
    assert summarize([torch.zeros(3)]) == "[Tensor(3,) torch.float32]"
    assert summarize("x" * 200) == repr("x" * 77) + "..."
    assert summarize(None) == "None" and summarize(0.5) == "0.5"


class PrepareEverything:
    PLUGIN_NAME = "prepare_everything"

    @hookimpl
    def perl_prepare_model(self, model, role):
        return None


def test_trace_while_attaching(monkeypatch, capsys, make_trainer):
    trainer = make_trainer("dpo", max_steps=1)
    monkeypatch.setenv(ENV_TRACE, "1")
    attach(trainer, plugins=[PrepareEverything()])
    lines = trace_lines(capsys.readouterr().err)
    prepared = [m for m in lines if m["hook"] == "perl_prepare_model"]
    assert [m["plugins"] for m in prepared] == ["prepare_everything"] * 2
    assert "role='policy'" in prepared[0]["args"] and "role='reference'" in prepared[1]["args"]
    assert "model=LlamaForCausalLM" in prepared[0]["args"]
    assert [m["hook"] for m in lines][:2] == ["perl_check_trainer", "perl_configure"]
