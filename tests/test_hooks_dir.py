"""The drop-in plugin files of hooks/: loading by path, their hooks in isolation, and short real runs."""

import copy
import dataclasses
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import perl_plugins
from perl_plugins import hookspecs
from perl_plugins.errors import PluginIncompatibleError, PluginOptionError
from perl_plugins.host.arguments import make_plugin_arguments
from perl_plugins.host.plugin_set import PluginSet
from perl_plugins.host.registry import load

HOOKS = Path(__file__).resolve().parents[1] / "hooks"
LENGTH_PENALTY = str(HOOKS / "length_penalty.py")
TEMPLATE = str(HOOKS / "plugin_template.py")
MONITOR = str(HOOKS / "reward_hacking_monitor.py")
ALL_FILES = [LENGTH_PENALTY, TEMPLATE, MONITOR]

PROMPTS = ["User: a latte please\n", "User: one espresso\n", "User: hi\n", "User: cold brew?\n"]


# --- a tiny Llama, also saved to disk (GRPO loads its reference model from the path). The embedded
# tokenizer fixture (with $PERL_PLUGINS_CACHE in a tmp dir) comes from conftest.py.


def tiny_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def grpo_trainer(model_dir, tokenizer, tmp_path, reward_func, max_steps=2):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        use_cpu=True,
        report_to="none",
        max_steps=max_steps,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        logging_steps=1,
        beta=0.1,  # so trl logs "kl"
        save_strategy="no",
        disable_tqdm=True,
    )
    dataset = Dataset.from_dict({"prompt": PROMPTS * 2})
    return GRPOTrainer(
        model=model_dir, reward_funcs=reward_func, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def stock_trainer(tokenizer, tmp_path, model=None) -> Trainer:
    ids = tokenizer(PROMPTS, padding="max_length", max_length=12, truncation=True)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path / "stock"),
        use_cpu=True,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(model=model or tiny_model(tokenizer), args=args, train_dataset=dataset)


# --- every file


@pytest.mark.parametrize("path", ALL_FILES)
def test_file_loads_by_path_with_prefixed_documented_options(path):
    plugin = load(path)
    assert plugin.name == Path(path).stem
    option_cls = PluginSet.from_names([path]).option_classes[plugin.name]
    fields = dataclasses.fields(option_cls)
    assert fields
    for field in fields:
        assert field.name.startswith(plugin.name + "_")
        assert field.metadata["help"]
    option_cls()  # the defaults are valid


def test_options_of_local_files_become_command_line_flags():
    arguments_cls = make_plugin_arguments([LENGTH_PENALTY, MONITOR])
    (args,) = HfArgumentParser(arguments_cls).parse_args_into_dataclasses(
        args=[
            "--plugins", f"{LENGTH_PENALTY},{MONITOR}",
            "--length_penalty_coef", "0.5",
            "--length_penalty_reward_funcs", "all",
            "--reward_hacking_monitor_stop", "true",
        ]
    )  # fmt: skip
    plugins, options = args.attach_kwargs()
    assert plugins == [LENGTH_PENALTY, MONITOR]
    assert options["length_penalty_coef"] == 0.5
    assert options["length_penalty_reward_funcs"] == "all"
    assert options["reward_hacking_monitor_stop"] is True
    assert options["reward_hacking_monitor_window"] == 5


@pytest.mark.parametrize("path", [LENGTH_PENALTY, MONITOR])
def test_rl_plugins_refuse_a_stock_trainer_without_touching_it(path, tokenizer, tmp_path):
    trainer = stock_trainer(tokenizer, tmp_path)
    before = dict(vars(trainer))
    with pytest.raises(PluginIncompatibleError, match="GRPO"):
        perl_plugins.attach(trainer, plugins=path)
    assert vars(trainer) == before


# --- length_penalty


def test_length_penalty_shapes_chosen_columns_of_string_and_chat_completions():
    lp = load(LENGTH_PENALTY).module
    trainer = SimpleNamespace(reward_func_names=["accuracy", "format"])
    rewards = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, float("nan")]])
    completions = [
        "abcd",  # 4 chars
        [{"role": "assistant", "content": "ab"}],  # 2 chars of message content
        [{"role": "assistant", "content": [{"type": "text", "text": "abcdefgh"}, {"type": "image"}]}],  # 8
    ]

    def shape(**opts):
        options = {"length_penalty": lp.LengthPenaltyOptions(length_penalty_coef=0.5, length_penalty_target=1, **opts)}
        return lp.perl_shape_rewards(trainer=trainer, completions=completions, rewards=rewards, options=options)

    first = shape()
    torch.testing.assert_close(first[:, 0], torch.tensor([1 - 0.5 * 3, 1 - 0.5 * 1, 1 - 0.5 * 7]))
    torch.testing.assert_close(first[:, 1], rewards[:, 1], equal_nan=True)  # other column and NaN untouched
    assert rewards[0, 0] == 1.0  # the input is not modified in place

    by_name = shape(length_penalty_reward_funcs="format")
    torch.testing.assert_close(by_name[:, 0], rewards[:, 0])
    torch.testing.assert_close(by_name[:2, 1], torch.tensor([2 - 1.5, 2 - 0.5]))
    assert torch.isnan(by_name[2, 1])  # an unscorable reward stays unscorable

    both = shape(length_penalty_reward_funcs="all")
    torch.testing.assert_close(both[:2], torch.tensor([[-0.5, 0.5], [0.5, 1.5]]))


def test_length_penalty_rejects_bad_options():
    lp = load(LENGTH_PENALTY).module
    with pytest.raises(PluginOptionError, match="length_penalty_coef"):
        PluginSet.from_names([LENGTH_PENALTY]).configure_options({"length_penalty_coef": -1.0})
    with pytest.raises(PluginOptionError, match="'nope'"):
        lp.resolve_columns("0,nope", ["accuracy"])
    with pytest.raises(PluginOptionError, match="'3'"):
        lp.resolve_columns("3", ["accuracy"])


def test_length_penalty_in_a_real_grpo_run(model_dir, tokenizer, tmp_path):
    lp = load(LENGTH_PENALTY).module
    coef, target = 0.01, 5
    lengths_per_round = []

    def const(completions, **kwargs):
        lengths_per_round.append([lp.completion_length(c) for c in completions])
        return [1.0] * len(completions)

    trainer = grpo_trainer(model_dir, tokenizer, tmp_path, const)
    perl_plugins.attach(trainer, plugins=LENGTH_PENALTY, length_penalty_coef=coef, length_penalty_target=target)
    trainer.train()

    logged = [log for log in trainer.state.log_history if "reward" in log]
    assert len(logged) == len(lengths_per_round) == 2  # one generation round per logged step
    for log, lengths in zip(logged, lengths_per_round):
        penalty = sum(coef * max(0, n - target) for n in lengths) / len(lengths)
        assert penalty > 0
        assert log["reward"] == pytest.approx(1.0 - penalty, abs=1e-5)
        assert log["rewards/const/mean"] == pytest.approx(1.0 - penalty, abs=1e-5)


# --- plugin_template


def test_template_attaches_and_leaves_a_stock_trainer_run_unchanged(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    plain = stock_trainer(tokenizer, tmp_path / "plain", model=copy.deepcopy(model))
    plain.train()

    attached = stock_trainer(tokenizer, tmp_path / "attached", model=copy.deepcopy(model))
    n_callbacks = len(attached.callback_handler.callbacks)
    perl_plugins.attach(attached, plugins=TEMPLATE, plugin_template_scale=0.5)
    assert attached.perl_plugins.names == ["plugin_template"]
    assert attached.perl_plugins.options["plugin_template"].plugin_template_scale == 0.5
    assert not {"compute_loss", "log", "create_optimizer", "_save_checkpoint"} & set(vars(attached))
    assert len(attached.callback_handler.callbacks) == n_callbacks
    attached.train()

    def losses(trainer):
        return [log["loss"] for log in trainer.state.log_history if "loss" in log]

    assert len(losses(plain)) == 2
    assert losses(attached) == losses(plain)
    for a, b in zip(attached.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)


def test_template_commented_examples_are_valid_hooks(tmp_path):
    """Uncommenting every example gives a plugin pluggy accepts, implementing every hook."""
    text = Path(TEMPLATE).read_text()
    uncommented = re.sub(r"^# (?=@perl_plugins\.hookimpl|def |    )", "", text, flags=re.MULTILINE)
    path = tmp_path / "plugin_template.py"
    path.write_text(uncommented)
    plugin_set = PluginSet.from_names([str(path)])  # validates hook names and argument names
    specs = [name for name in vars(hookspecs) if name.startswith("perl_")]
    assert [name for name in specs if not plugin_set.implements(name)] == []


# --- reward_hacking_monitor


def feed(detector, logs):
    """Feed logs one by one; return {index of the log: kinds of the alerts it raised}."""
    raised = {}
    for i, log in enumerate(logs):
        alerts = detector.update(log, step=i)
        if alerts:
            raised[i] = sorted(a.kind for a in alerts)
    return raised


@pytest.fixture
def monitor():
    return load(MONITOR).module


def test_monitor_is_silent_on_a_calm_run(monitor):
    noise = [0.0003 * ((i * 7) % 5 - 2) for i in range(40)]
    logs = [
        {"kl": 0.02 + 0.0005 * i + noise[i], "entropy": 2.0 - 0.01 * i + noise[i], "reward": 0.5 + noise[i]}
        for i in range(40)
    ]
    detector = monitor.RewardHackingDetector()
    assert feed(detector, logs) == {}
    assert len(detector.history) == 40


def test_monitor_flags_kl_acceleration_with_rising_reward_as_hacking(monitor):
    kl = [0.01 + 0.001 * i for i in range(5)] + [0.015 + 0.05 * i for i in range(1, 6)]
    rising = [{"kl": k, "entropy": 2.0, "reward": 0.1 * i} for i, k in enumerate(kl)]
    assert feed(monitor.RewardHackingDetector(), rising) == {9: ["kl_acceleration", "reward_hacking"]}

    flat = [{**log, "reward": 0.5} for log in rising]
    assert feed(monitor.RewardHackingDetector(), flat) == {9: ["kl_acceleration"]}


def test_monitor_flags_kl_threshold_and_entropy_collapse_once_until_recovered(monitor):
    detector = monitor.RewardHackingDetector(kl_max=0.5, entropy_fraction=0.25)
    entropy = [2.0] * 5 + [0.4, 0.3, 2.0, 0.2]
    logs = [{"kl": 0.01, "entropy": e, "reward": 0.0} for e in entropy]
    logs[6]["kl"] = 0.9
    logs.insert(3, {"eval_kl": 9.0, "eval_entropy": 0.0})  # eval logs are ignored
    raised = feed(detector, logs)
    # log 6 is the collapse (index shifted by the eval log), 7 stays collapsed: no repeat; 9 collapses again.
    assert raised == {6: ["entropy_collapse"], 7: ["kl_threshold"], 9: ["entropy_collapse"]}
    assert len(detector.history) == len(entropy)


@pytest.mark.parametrize("stop", [False, True])
def test_monitor_hook_warns_logs_alerts_and_stops_on_request(monitor, stop):
    opts = monitor.RewardHackingMonitorOptions(reward_hacking_monitor_stop=stop)
    options = {"reward_hacking_monitor": opts}
    detector = monitor.RewardHackingDetector.from_options(opts)
    trainer = SimpleNamespace(perl_plugins=SimpleNamespace(state={"reward_hacking_monitor": detector}))
    control = SimpleNamespace(should_training_stop=False)
    state = SimpleNamespace(global_step=0)
    for entropy in [2.0] * 5:
        logs = {"kl": 0.01, "entropy": entropy, "reward": 0.0}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning on calm logs
            monitor.perl_on_log(trainer=trainer, logs=logs, state=state, control=control, options=options)
        assert logs["monitor/alerts"] == 0.0
    state.global_step = 6
    logs = {"kl": 0.01, "entropy": 0.1, "reward": 0.0}
    with pytest.warns(monitor.RewardHackingWarning, match="step 6: entropy_collapse"):
        monitor.perl_on_log(trainer=trainer, logs=logs, state=state, control=control, options=options)
    assert logs["monitor/alerts"] == 1.0
    assert logs["monitor/entropy_collapse"] == 1.0 and logs["monitor/kl_acceleration"] == 0.0
    assert control.should_training_stop is stop


def test_monitor_sees_every_log_of_a_real_grpo_run(model_dir, tokenizer, tmp_path):
    trainer = grpo_trainer(model_dir, tokenizer, tmp_path, lambda completions, **kw: [1.0] * len(completions), 3)
    perl_plugins.attach(trainer, plugins=MONITOR)
    trainer.train()

    logged = [log for log in trainer.state.log_history if "reward" in log]
    detector = perl_plugins.state(trainer)["reward_hacking_monitor"]
    assert len(logged) == len(detector.history) == 3
    assert [h["kl"] for h in detector.history] == [log["kl"] for log in logged]
    assert all(log["monitor/alerts"] == 0.0 for log in logged)  # added keys reach the log history
    assert trainer.state.global_step == 3  # not stopped
