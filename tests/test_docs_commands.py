"""The docs' shell commands as a new user runs them: every command line in README.md and
recipes/README.md, and the launch lines in the YAML headers, names only flags, pip extras and make
targets that exist; and every command line of README.md and recipes/README.md runs on this CPU
machine with no device flags (tiny sizes added, nothing else).

Not run, on purpose (each is reported as a skip with its reason): ``make demo`` / ``make test``
(this suite is ``make test``; the demo is tests/test_perl_recipe.py), ``pip install`` (no network;
the package is installed), lines naming a hub id such as ``Qwen/...`` (no network), and the
8-process ``accelerate launch`` lines (tests/test_scaling_out.py launches the same configs with 2
processes on CPU).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "recipes/README.md")
YAML_HEADERS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))
TRAIN_COMMANDS = ("sft", "reward", "dpo", "kto", "grpo", "rloo")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _join_continuations(lines: list[str]) -> list[str]:
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return joined


def doc_commands(doc: str) -> list[str]:
    """Shell command lines of the ```bash blocks of ``doc``, continuations joined (comment lines
    dropped; a trailing comment stays, bash ignores it)."""
    text = (ROOT / doc).read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in _join_continuations(block.splitlines()):
            if shlex.split(line, comments=True):
                commands.append(line.strip())
    return commands


def inline_commands(doc: str) -> list[str]:
    """Commands quoted inline in the prose (`perl-plugins plugins`, `python recipes/dpo.py ...`)."""
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", (ROOT / doc).read_text(), flags=re.S))
    return [s for s in spans if s.split()[0] in ("perl-plugins", "python", "accelerate", "pip", "make") and " " in s]


def yaml_header_commands(path: str) -> list[str]:
    """Launch lines in a YAML's leading comment block: ``#   python ...`` / ``#   accelerate ...``."""
    header = []
    for line in (ROOT / path).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:])
    commands = []
    for line in _join_continuations(header):
        if line.split()[:1] in (["python"], ["accelerate"], ["perl-plugins"]):
            commands.append(line.strip())
    return commands


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0][2:] for w in words if w.startswith("--")]


def hub_id_in(words: list[str]) -> str | None:
    for flag, value in zip(words, words[1:]):
        if (
            (flag.endswith("model_name_or_path") or flag == "--dataset_name")
            and HUB_ID.match(value)
            and not Path(value).exists()
        ):
            return value
    return None


# ---------------------------------------------------------------- what a command may name


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")}


def _dataclass_flags(*classes: type) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls)} | {"config", "help"}


def recipe_flags(name: str) -> set[str]:
    """Fields of a recipe's settings dataclass (the one its TrlParser reads)."""
    module = importlib.import_module(f"perl_plugins.recipes.{name}")
    configs = [
        obj
        for obj in vars(module).values()
        if dataclasses.is_dataclass(obj)
        and isinstance(obj, type)
        and obj.__module__ == module.__name__
        and "output_dir" in {f.name for f in dataclasses.fields(obj)}
    ]
    assert configs, f"recipes/{name}.py has no settings dataclass"
    return _dataclass_flags(*configs)


@functools.cache
def benchmark_flags(script: str) -> set[str]:
    """The flags a benchmark's ``--help`` lists: the ``--`` strings of its ``add_argument`` calls (not
    suppressed ones), read from the source; running ``--help`` imports torch, ~20 s a benchmark."""
    found = {"help"}
    for node in ast.walk(ast.parse((ROOT / script).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            if any(k.arg == "help" and getattr(k.value, "attr", None) == "SUPPRESS" for k in node.keywords):
                continue  # internal flags --help does not list
            found |= {a.value[2:] for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return found


def cli_flags(words: list[str]) -> set[str]:
    """Flags ``perl-plugins COMMAND`` accepts, given the plugins the line enables."""
    command = words[0]
    if command in TRAIN_COMMANDS:
        import trl

        from perl_plugins.cli.train import TRAINERS, _plugins_requested, _script_arguments
        from perl_plugins.host.arguments import make_plugin_arguments

        config = getattr(trl, TRAINERS[command][1])
        plugin_args = make_plugin_arguments(_plugins_requested(words))
        # only the enabled plugins' options count: others are refused
        enabled = {n for n in (_plugins_requested(words) or "").split(",") if n}
        owned = {k for k, owner in plugin_args.option_owners.items() if owner not in enabled}
        return _dataclass_flags(_script_arguments(), config, trl.ModelConfig, plugin_args) - owned
    if command == "demo":
        return recipe_flags("perl")
    if command == "export":
        return {"out", "merge", "base", "adapter", "help"}
    if command == "plugins":
        return {"json", "plugins", "help"}
    raise AssertionError(f"unknown perl-plugins command {command!r}")


def accelerate_flags() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return _option_strings(launch_command_parser())


def check_command(command: str) -> list[str]:
    """The flags / extras / targets ``command`` names that do not exist (empty: all exist)."""
    words = shlex.split(command, comments=True)
    if words[0] == "accelerate":
        assert words[1] == "launch"
        split = words.index("-m")
        assert words[split + 1] == "perl_plugins.cli", command
        bad = [f for f in flags(words[2:split]) if f not in accelerate_flags()]
        return bad + check_command(shlex.join(["perl-plugins", *words[split + 2 :]]))
    if words[0] == "perl-plugins":
        return [f for f in flags(words[2:]) if f not in cli_flags(words[1:])]
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        return [f for f in flags(words[2:]) if f not in benchmark_flags(words[1])]
    if words[0] == "python" and words[1].endswith(".py"):
        return [f for f in flags(words[2:]) if f not in recipe_flags(Path(words[1]).stem)]
    if words[0] == "python" and words[1] == "-m":
        return [] if words[2] == "pytest" else [f"-m {words[2]}"]
    if words[0] == "pip":
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        named = {e.strip() for w in words for m in re.findall(r"\[([^\]]*)\]", w) for e in m.split(",")}
        return sorted(named - extras)
    if words[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        return [t for t in words[1:] if t not in targets]
    return []


ALL_COMMANDS = [(doc, c) for doc in DOCS for c in doc_commands(doc) + inline_commands(doc)] + [
    (path, c) for path in YAML_HEADERS for c in yaml_header_commands(path)
]


def test_the_docs_have_commands():
    assert {doc for doc, _ in ALL_COMMANDS} >= {*DOCS, "recipes/accelerate/ddp.yaml", "recipes/perl.yaml"}


@pytest.mark.parametrize("doc, command", ALL_COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in ALL_COMMANDS])
def test_command_names_only_what_exists(doc, command):
    assert check_command(command) == [], f"{doc}: {command}"


@pytest.mark.parametrize("doc", DOCS + ("hooks/README.md", "benchmarks/README.md"))
def test_pip_extras_in_prose_exist(doc):
    text = (ROOT / doc).read_text()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {e.strip() for m in re.findall(r"(?:perl-plugins|\.)\[([\w,\s-]+)\]", text) for e in m.split(",")}
    assert named <= extras, f"{doc} names extras {sorted(named - extras)}; pyproject has {sorted(extras)}"


def test_no_doc_suggests_accelerate_cpu_flag():
    """accelerate's --cpu starts a single process; the scaling-out docs say never to use it."""
    for path in ("README.md", "recipes/README.md", *YAML_HEADERS):
        text = re.sub(r"\s*\n#?\s*", " ", (ROOT / path).read_text())  # lines (and YAML comments) joined
        for match in re.finditer(r"--cpu\b", text):
            before = text[max(0, match.start() - 40) : match.start()]
            assert re.search(r"\bnot\b", before), f"{path}: ...{before}--cpu..."


# ---------------------------------------------------------------- running them


def _tiny_flags(command: str) -> list[str]:
    """Sizes that make a line run in seconds; never a device flag."""
    tiny = [
        "--model_size",
        "tiny",
        "--max_steps",
        "1",
        "--max_train_samples",
        "8",
        "--max_eval_samples",
        "16",
        "--per_device_train_batch_size",
        "2",
        "--save_strategy",
        "no",
    ]
    if command in ("grpo", "rloo"):
        tiny = [*tiny, "--num_generations", "2", "--max_completion_length", "4", "--max_eval_samples", "4"]
    return tiny


def _recipe_tiny_flags(name: str) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_perl_recipe import TINY as PERL_TINY
        from test_recipes import RUNS
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return PERL_TINY if name == "perl" else RUNS[name][0]


def _skip_reason(words: list[str]) -> str | None:
    if words[0] == "make":
        return "make demo / make test: not re-run from inside the test suite"
    if words[0] == "pip":
        return "pip install: no network here; the package is installed"
    if words[0] == "accelerate":
        return "8-process launch: tests/test_scaling_out.py launches the same configs with 2 CPU processes"
    if words[0] == "python" and any(w.startswith("$") for w in words):
        return (
            "the real-model runs: their shell variables name smollm2-135m-instruct, minutes each on CPU; "
            "tests/test_real_model.py and tests/test_recipes.py cover the same paths"
        )
    hub = hub_id_in(words)
    if hub:
        return f"names the hub id {hub} (no network here)"
    return None


RUN_LINES = [(doc, c) for doc in DOCS for c in doc_commands(doc)]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_doc_command_runs_on_cpu(tmp_path, monkeypatch, capsys):
    """Each doc's lines in order, in one fresh directory (later lines use what earlier ones wrote),
    with ``recipes/`` and ``hooks/`` there as in a clone; shell lines (``cp``, variables) run in one
    bash session, python scripts in a fresh interpreter."""
    from perl_plugins.cli import main as cli_main

    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "hooks").symlink_to(ROOT / "hooks")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    shell_state: list[str] = []  # earlier shell lines, replayed so variables carry over
    skipped, ran = [], []
    for doc, command in RUN_LINES:
        words = shlex.split(command, comments=True)
        reason = _skip_reason(words)
        if reason:
            skipped.append(f"{doc}: {command}  ({reason})")
            continue
        if words[0] == "perl-plugins":
            argv = words[1:]
            if argv[0] in TRAIN_COMMANDS:
                argv += _tiny_flags(argv[0])
            code = cli_main(argv)
            assert code == 0, f"{doc}: {command}\n{capsys.readouterr().err[-3000:]}"
        elif words[0] == "python" and words[1].endswith(".py"):
            argv = [
                sys.executable,
                *words[1:],
                *_recipe_tiny_flags(Path(words[1]).stem),
                "--output_dir",
                str(tmp_path / "outputs" / Path(words[1]).stem),
            ]
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
            assert done.returncode == 0, f"{doc}: {command}\n{done.stderr[-3000:]}"
            assert "no GPU or other accelerator found" in done.stderr  # the CPU choice was said
        else:
            script = "set -e\n" + "\n".join([*shell_state, command])
            done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{doc}: {command}\n{done.stderr[-3000:]}"
            shell_state.append(command)
        ran.append(command)
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")
    assert len(ran) >= 8 and all("Qwen/" not in c for c in ran)
