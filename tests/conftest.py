"""Shared fixtures: a tiny Llama, the embedded tokenizer, small datasets, one builder per trainer type.

Also checks hook coverage: every hook call with at least one implementation is recorded
(pluggy's hook-call monitoring), and a full run of ``tests/`` fails if some hookspec never fired.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from perl_plugins import hookspecs
from perl_plugins.host.tracing import add_monitor

TESTS_DIR = Path(__file__).resolve().parent
PLUGINS_DIR = TESTS_DIR / "plugins_for_tests"
MAX_STEPS = 3
TRAINER_KINDS = ("trainer", "sft", "reward", "dpo", "kto", "grpo", "rloo")

# The models are tiny: a second intra-op thread only adds synchronisation, and on a machine shared
# with other jobs it makes every op wait for a preempted thread.
torch.set_num_threads(1)


# ---------------------------------------------------------------- hook coverage


def hookspec_names() -> list[str]:
    """Every function in perl_plugins.hookspecs marked ``@hookspec``."""
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, marker))


class HookRecorder:
    """Names of the hooks the host fired with at least one implementation listening."""

    def __init__(self) -> None:
        self.called: set[str] = set()

    def install(self) -> None:
        """Watch every plugin set's hook calls for the whole session, through pluggy's own monitoring."""

        def before(hook_name: str, hook_impls: Sequence[Any], kwargs: Any) -> None:
            if hook_impls:
                self.called.add(hook_name)

        add_monitor(before, lambda outcome, hook_name, hook_impls, kwargs: None)

    def missing(self) -> list[str]:
        return [name for name in hookspec_names() if name not in self.called]


HOOKS = HookRecorder()
HOOKS.install()  # at import, so that hooks fired while collecting or in session fixtures count too


def ran_whole_suite(config: pytest.Config, collected_files: set[Path], deselected: int, tests_dir: Path) -> bool:
    """True when every test file under ``tests_dir`` was collected, nothing was deselected and
    the tests actually ran (not ``--collect-only``)."""
    if config.option.collectonly or config.option.keyword or config.option.markexpr or deselected:
        return False
    if any("::" in arg for arg in config.args):
        return False
    return {p.resolve() for p in tests_dir.rglob("test_*.py")} <= collected_files


# Files that launch processes or train real models, longest first: `make test` hands them out first
# (pytest-xdist, --no-loadscope-reorder), so the longest file starts at once and the other worker
# fills in around it instead of idling at the end.
SLOW_FILES = ("test_scaling_out.py", "test_real_model.py", "test_recipes.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    order = {name: rank for rank, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: order.get(item.path.name, len(SLOW_FILES)))  # stable: the rest keep their order


_deselected = 0


@pytest.hookimpl
def pytest_deselected(items: list[pytest.Item]) -> None:
    global _deselected
    _deselected += len(items)


_worker_collected: set[Path] = set()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """Under pytest-xdist each worker records its own hooks and files: the controller adds them up."""
    output = getattr(node, "workeroutput", {})
    HOOKS.called.update(output.get("perl_hooks_called", ()))
    _worker_collected.update(Path(p) for p in output.get("perl_collected", ()))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    collected = {Path(str(item.path)).resolve() for item in session.items}
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: report to the controller, which decides
        workeroutput["perl_hooks_called"] = sorted(HOOKS.called)
        workeroutput["perl_collected"] = sorted(map(str, collected))
        return
    collected |= _worker_collected
    if not ran_whole_suite(session.config, collected, _deselected, TESTS_DIR):
        return
    missing = HOOKS.missing()
    if missing:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"hookspecs never exercised by the test suite: {', '.join(missing)}"
        if reporter is not None:
            reporter.write(f"\n{message}\n", red=True)  # after the progress line, which has no newline yet
        else:
            print(message)
        if session.exitstatus == 0:
            session.exitstatus = 1


@pytest.fixture
def hook_recorder() -> HookRecorder:
    return HOOKS


# ---------------------------------------------------------------- environment


@pytest.fixture(scope="session", autouse=True)
def perl_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep the embedded tokenizer (and anything else cached) out of the user's cache dir."""
    path = tmp_path_factory.mktemp("perl_plugins_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERL_PLUGINS_CACHE", str(path))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield path


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose plugins explicitly: the caller's $PERL_PLUGINS must not leak in."""
    monkeypatch.delenv("PERL_PLUGINS", raising=False)
    monkeypatch.delenv("PERL_PLUGINS_DISABLE", raising=False)


@pytest.fixture(scope="session")
def plugin_file() -> Callable[[str], str]:
    """Path (as a string) of a plugin under tests/plugins_for_tests/."""

    def path(stem: str) -> str:
        return str(PLUGINS_DIR / f"{stem}.py")

    return path


# ---------------------------------------------------------------- models, data, trainers


@pytest.fixture(scope="session")
def tokenizer(perl_cache: Path):
    from perl_plugins.models.embedded import build_tokenizer

    return build_tokenizer()


def tiny_llama_config(tokenizer, **extra: Any):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def tiny_lm(tokenizer, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer))


def tiny_reward_model(tokenizer, seed: int = 0):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=1))


_PROMPTS = [
    "User: a latte please\nAgent:",
    "User: one espresso\nAgent:",
    "User: iced mocha\nAgent:",
    "User: tea?\nAgent:",
]
_GOOD = [" Sure, one latte.", " One espresso, coming up.", " Iced mocha it is.", " We have green tea."]
_BAD = [" No.", " What?", " Bye.", " Coffee only."]


@pytest.fixture(scope="session")
def datasets_by_kind() -> dict[str, Any]:
    """One small in-memory dataset per trainer kind (8 rows each)."""
    from datasets import Dataset

    prompts, good, bad = _PROMPTS * 2, _GOOD * 2, _BAD * 2
    return {
        "text": Dataset.from_dict({"text": [p + c for p, c in zip(prompts, good)]}),
        "prompt_completion": Dataset.from_dict({"prompt": prompts, "completion": good}),
        "preference": Dataset.from_dict({"prompt": prompts, "chosen": good, "rejected": bad}),
        "kto": Dataset.from_dict(
            {
                "prompt": prompts,
                "completion": [g if i % 2 else b for i, (g, b) in enumerate(zip(good, bad))],
                "label": [bool(i % 2) for i in range(len(prompts))],
            }
        ),
        "prompt": Dataset.from_dict({"prompt": prompts}),
    }


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A simple python reward function: longer completions score higher."""
    return [float(len(c)) / 10 for c in completions]


def lora_config(kind: str):
    from peft import LoraConfig

    return LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        task_type="SEQ_CLS" if kind == "reward" else "CAUSAL_LM",
    )


def build_trainer(
    kind: str,
    tokenizer,
    data: dict[str, Any],
    output_dir: Path,
    *,
    lora: bool = False,
    max_steps: int = MAX_STEPS,
    seed: int = 0,
    **args: Any,
):
    """A fresh stock trainer of ``kind`` on a fresh tiny model (same seed, same weights)."""
    import trl
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    common = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    common.update(args)
    peft = {"peft_config": lora_config(kind)} if lora else {}
    policy = tiny_lm(tokenizer, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "trainer":
            if lora:
                from peft import get_peft_model

                policy = get_peft_model(policy, lora_config(kind))
            train = data["text"].map(lambda e: tokenizer(e["text"]), remove_columns=["text"])
            return Trainer(
                model=policy,
                args=TrainingArguments(**common),
                train_dataset=train,
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            )
        if kind == "sft":
            return trl.SFTTrainer(
                model=policy,
                args=trl.SFTConfig(**common, max_length=64),
                train_dataset=data["prompt_completion"],
                processing_class=tokenizer,
                **peft,
            )
        if kind == "reward":
            return trl.RewardTrainer(
                model=tiny_reward_model(tokenizer, seed),
                args=trl.RewardConfig(**common, max_length=64),
                train_dataset=data["preference"],
                processing_class=tokenizer,
                **peft,
            )
        # A model instance has no hub id to load a reference copy from: pass one unless LoRA
        # (then trl uses the base with adapters disabled).
        ref = {} if lora else {"ref_model": tiny_lm(tokenizer, seed)}
        if kind == "dpo":
            return trl.DPOTrainer(
                model=policy,
                args=trl.DPOConfig(**common, max_length=64),
                train_dataset=data["preference"],
                processing_class=tokenizer,
                **ref,
                **peft,
            )
        if kind == "kto":
            return trl.KTOTrainer(
                model=policy,
                args=trl.KTOConfig(**common, max_length=64),
                train_dataset=data["kto"],
                processing_class=tokenizer,
                **ref,
                **peft,
            )
        rl = dict(num_generations=2, max_completion_length=8, beta=0.0)
        if kind == "grpo":
            return trl.GRPOTrainer(
                model=policy,
                reward_funcs=length_reward,
                args=trl.GRPOConfig(**common, **rl),
                train_dataset=data["prompt"],
                processing_class=tokenizer,
                **peft,
            )
        if kind == "rloo":
            return trl.RLOOTrainer(
                model=policy,
                reward_funcs=length_reward,
                args=trl.RLOOConfig(**common, **rl),
                train_dataset=data["prompt"],
                processing_class=tokenizer,
                **peft,
            )
    raise ValueError(f"unknown trainer kind {kind!r}")


@pytest.fixture(scope="session")
def make_trainer(tokenizer, datasets_by_kind, tmp_path_factory) -> Callable[..., Any]:
    """``make_trainer(kind, lora=False, **training_args)``: a fresh stock trainer (see ``build_trainer``)."""

    def make(kind: str, **kwargs: Any):
        output_dir = kwargs.pop("output_dir", None) or tmp_path_factory.mktemp(f"out_{kind}")
        return build_trainer(kind, tokenizer, datasets_by_kind, output_dir, **kwargs)

    return make


def train_quietly(trainer) -> list[dict[str, float]]:
    """Train and return the per-step log dicts (the final summary dict excluded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def step_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in train_quietly(trainer)]


NATIVE_ABORT = "terminate called without an active exception"


def run_multiprocess(argv: Sequence[str], output: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True, **kwargs)`` for a multi-process launch
    (gloo, DeepSpeed) that writes only under ``output``, run once more from scratch if a process
    died of a native abort (libstdc++'s ``terminate`` on a live gloo thread; seen about once in 150
    launches, never reproduced on demand). The retry is printed, so a run that needed one says so."""
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0 and NATIVE_ABORT in proc.stderr:
        print(f"[multiprocess] {output.name}: a process aborted ({NATIVE_ABORT!r}); running again")
        if output.is_dir():
            shutil.rmtree(output)
        else:
            output.unlink(missing_ok=True)
        proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    return proc


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str) -> types.ModuleType:
    """A benchmark script loaded as a module (benchmarks/ is not a package; its helpers import by
    plain name, so the folder goes on ``sys.path``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{Path(filename).stem}_bench", BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
