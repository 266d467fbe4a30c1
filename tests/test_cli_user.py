"""The CLI as a new user meets it: CPU settings chosen when there is no accelerator, correct pair
metrics, one clear line (exit 2) for every user error, small files refused with counts, export of
any directory explained, one default model."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

from perl_plugins.cli import main as cli_main
from perl_plugins.data.taskmaster import DEFAULT_REWARD_FILE

TINY = [
    "--model_size",
    "tiny",
    "--max_steps",
    "1",
    "--per_device_train_batch_size",
    "2",
    "--max_train_samples",
    "4",
    "--max_eval_samples",
    "16",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
]


def error_line(capsys: pytest.CaptureFixture, code: int) -> str:
    """The CLI's stderr after a user error: exit 2, one ``perl-plugins: error:`` line, no traceback."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("perl-plugins: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 20 rows of the shipped coffee feedback: a valid file, too small to split."""
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    with gzip.open(DEFAULT_REWARD_FILE, "rt") as f:
        path.write_text("".join(f.readline() for _ in range(20)))
    return path


# ---------------------------------------------------------------- 1. CPU settings


def test_cpu_settings_are_chosen_without_an_accelerator(monkeypatch, capsys, caplog):
    from perl_plugins.cli.train import parse
    from perl_plugins.training import device

    monkeypatch.setattr(device, "has_accelerator", lambda: False)
    monkeypatch.setattr(device, "_said", set())
    _, args, _, _ = parse("reward", ["--output_dir", "out"])
    assert args.use_cpu is True and args.bf16 is False
    said = capsys.readouterr().err + caplog.text
    assert said.count("no GPU") == 1  # one log line


@pytest.mark.parametrize(
    "flags, use_cpu, bf16",
    [
        (["--bf16", "true", "--use_cpu", "true"], True, True),
        (["--bf16", "false"], True, False),
        (["--use_cpu", "true"], True, False),
    ],
)
def test_explicit_device_flags_win(monkeypatch, flags, use_cpu, bf16):
    from perl_plugins.cli.train import parse
    from perl_plugins.training import device

    monkeypatch.setattr(device, "has_accelerator", lambda: False)
    _, args, _, _ = parse("reward", ["--output_dir", "out", *flags])
    assert (args.use_cpu, args.bf16) == (use_cpu, bf16)


def test_explicit_device_keys_in_yaml_win(monkeypatch, tmp_path):
    from perl_plugins.cli.train import parse
    from perl_plugins.training import device

    monkeypatch.setattr(device, "has_accelerator", lambda: False)
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: out\nuse_cpu: true\nbf16: true\n")
    _, args, _, _ = parse("reward", ["--config", str(config)])
    assert args.use_cpu is True and args.bf16 is True


def test_recipes_take_cpu_settings_from_one_place(monkeypatch):
    from perl_plugins.training import device

    monkeypatch.setattr(device, "has_accelerator", lambda: False)
    assert device.cpu_settings() == {"use_cpu": True, "bf16": False}
    monkeypatch.setattr(device, "has_accelerator", lambda: True)
    assert device.cpu_settings() == {}
    for recipe in ("perl", "dpo", "rrhf", "raft", "rlaif"):
        text = (Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.py").read_text()
        assert "torch.cuda.is_available()" not in text, recipe


# ---------------------------------------------------------------- 2. pair metrics


def test_pair_accuracy_agrees_with_the_trainers_own(tmp_path, capsys):
    out = tmp_path / "pairs"
    code = cli_main(
        [
            "reward",
            "--plugins",
            "lora",
            "--feedback",
            "pairs",
            "--output_dir",
            str(out),
            *TINY,
            "--max_eval_samples",
            "16",
            "--per_device_eval_batch_size",
            "16",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--model_size",
            "demo",  # the default base: the symptom (a tiny random model ranks alike either way)
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["eval_pair_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    # recomputed from the saved reward adapter on prompt + reply (prompt once, EOS as in training)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perl_plugins.data.defaults import default_dataset
    from perl_plugins.models.embedded import resolve_model
    from perl_plugins.models.reward import load_reward_adapter, score_texts
    from perl_plugins.training.reward_metrics import roc_auc

    base = resolve_model(None)
    model = load_reward_adapter(AutoModelForCausalLM.from_pretrained(base), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    pairs = default_dataset("reward", feedback="pairs")["test"].select(range(16))
    chosen = score_texts(model, tokenizer, [p + c for p, c in zip(pairs["prompt"], pairs["chosen"])])
    rejected = score_texts(model, tokenizer, [p + r for p, r in zip(pairs["prompt"], pairs["rejected"])])
    assert metrics["eval_pair_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    expected_auc = roc_auc(list(chosen) + list(rejected), [1] * 16 + [0] * 16)
    assert metrics["eval_auc"] == pytest.approx(expected_auc, abs=1e-6)


def test_pair_metrics_score_the_trainers_token_ids(make_trainer):
    """The scored sequences are the trainer's own ``chosen_ids``/``rejected_ids`` (prompt once)."""
    import torch

    from perl_plugins.training.reward_metrics import evaluate_trainer_pairs, roc_auc

    trainer = make_trainer("reward")
    trainer.eval_dataset = trainer.train_dataset
    metrics = evaluate_trainer_pairs(trainer)
    model = trainer.model.eval()
    with torch.no_grad():

        def reward(ids: list[int]) -> float:
            return model(input_ids=torch.tensor([ids])).logits.item()

        chosen = [reward(row["chosen_ids"]) for row in trainer.eval_dataset]
        rejected = [reward(row["rejected_ids"]) for row in trainer.eval_dataset]
    assert metrics["eval_pair_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(chosen))
    expected_auc = roc_auc(chosen + rejected, [1] * len(chosen) + [0] * len(rejected))
    assert metrics["eval_auc"] == pytest.approx(expected_auc, abs=1e-6)


# ---------------------------------------------------------------- 3. options of plugins not enabled


def test_option_of_a_plugin_not_enabled_is_refused(tmp_path, capsys):
    code = cli_main(["reward", "--plugins", "lora", "--grm_alpha", "0.05", "--output_dir", str(tmp_path), *TINY])
    line = error_line(capsys, code)
    assert "grm_alpha" in line and "'grm'" in line and "not enabled" in line


def test_option_of_a_plugin_not_enabled_in_yaml_is_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"plugins: lora\ngrm_alpha: 0.05\noutput_dir: {tmp_path}\n")
    code = cli_main(["reward", "--config", str(config), *TINY])
    line = error_line(capsys, code)
    assert "grm_alpha" in line and "'grm'" in line


def test_plugin_arguments_refuse_options_of_plugins_not_enabled():
    from trl import TrlParser

    from perl_plugins.errors import PluginOptionError
    from perl_plugins.host.arguments import make_plugin_arguments

    (args,) = TrlParser([make_plugin_arguments()]).parse_args_and_config(["--plugins", "lora", "--fp8_comm", "true"])
    with pytest.raises(PluginOptionError, match="'fp8'"):
        args.attach_kwargs()


# ---------------------------------------------------------------- 4. export


def test_export_of_a_missing_directory_says_so(tmp_path, capsys):
    code = cli_main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    line = error_line(capsys, code)
    assert "does not exist" in line and "did not complete" not in line


def test_export_of_a_stock_checkpoint_says_what_it_is(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "adapter_model.safetensors").write_bytes(b"")
    code = cli_main(["export", str(ckpt), "--out", str(tmp_path / "x")])
    line = error_line(capsys, code)
    assert "adapter_ckpt" in line and "did not complete" not in line


def test_resume_from_a_missing_directory_is_one_line(tmp_path, capsys):
    code = cli_main(
        [
            "reward",
            "--plugins",
            "lora,adapter_ckpt",
            "--output_dir",
            str(tmp_path),
            *TINY,
            "--resume_from_checkpoint",
            str(tmp_path / "checkpoint-9"),
        ]
    )
    line = error_line(capsys, code)
    assert "checkpoint-9" in line and "does not exist" in line


# ---------------------------------------------------------------- 5. small files


@pytest.mark.parametrize("feedback", ["pairs", "pointwise"])
def test_too_small_splits_are_refused_with_counts(small_file, feedback, tmp_path, capsys):
    code = cli_main(
        [
            "reward",
            "--plugins",
            "lora",
            "--feedback",
            feedback,
            "--taskmaster_file",
            str(small_file),
            "--output_dir",
            str(tmp_path),
            "--model_size",
            "tiny",
            "--max_steps",
            "1",
        ]
    )
    line = error_line(capsys, code)
    assert "small.jsonl" in line and "train" in line and any(ch.isdigit() for ch in line)


def test_pairs_trl_drops_for_length_are_counted(tmp_path, capsys):
    """trl's RewardTrainer drops pairs longer than max_length: an eval split emptied that way would
    end in an empty metric after training; it is refused before."""
    code = cli_main(
        [
            "reward",
            "--plugins",
            "lora",
            "--feedback",
            "pairs",
            "--max_length",
            "16",
            "--output_dir",
            str(tmp_path),
            *TINY,
        ]
    )
    line = error_line(capsys, code)
    assert "--max_length 16" in line and "0 training pairs" in line


def test_recipes_refuse_too_small_splits(small_file):
    from perl_plugins.data.defaults import default_dataset
    from perl_plugins.data.split_checks import SplitTooSmallError

    with pytest.raises(SplitTooSmallError, match=r"\d+ training"):
        default_dataset("reward", small_file)


# ---------------------------------------------------------------- 6. reward adapter without lora


def test_reward_adapter_without_lora_refused_before_anything_changes(make_trainer):
    from perl_plugins import attach
    from perl_plugins.errors import PluginIncompatibleError
    from perl_plugins.plugins.lora import AdapterReward

    trainer = make_trainer("rloo")
    trainer.reward_funcs = [AdapterReward("some_adapter")]
    before = dict(vars(trainer))
    with pytest.raises(PluginIncompatibleError, match="lora"):
        attach(trainer, plugins="fp8")
    assert dict(vars(trainer)) == before


def test_cli_reward_adapter_without_lora(tmp_path, capsys):
    code = cli_main(["rloo", "--reward_adapter", str(tmp_path / "rm"), "--output_dir", str(tmp_path), *TINY])
    line = error_line(capsys, code)
    assert "--reward_adapter" in line and "lora" in line


# ---------------------------------------------------------------- 7. one rule for user errors


def test_data_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversation_id": "a"}\n')
    code = cli_main(
        ["reward", "--plugins", "lora", "--taskmaster_file", str(bad), "--output_dir", str(tmp_path), *TINY]
    )
    assert "bad.jsonl" in error_line(capsys, code)


def test_missing_data_file_is_one_line(tmp_path, capsys):
    code = cli_main(["reward", "--taskmaster_file", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path), *TINY])
    assert "none.jsonl" in error_line(capsys, code)


def test_rl_without_a_reward_is_one_line(tmp_path, capsys):
    code = cli_main(["grpo", "--output_dir", str(tmp_path), *TINY, "--num_generations", "2"])
    assert "--reward_adapter" in error_line(capsys, code)


def test_unknown_flag_is_one_line(tmp_path, capsys):
    code = cli_main(["reward", "--no_such_flag", "1", "--output_dir", str(tmp_path)])
    assert "--no_such_flag" in error_line(capsys, code)


def test_value_a_trainer_config_rejects_is_one_line(tmp_path, capsys):
    code = cli_main(
        ["grpo", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "3", "--num_generations", "2"]
    )
    assert "num_generations" in error_line(capsys, code)


# ---------------------------------------------------------------- 8. typo in a local plugin path


def test_typo_in_local_plugin_path_names_the_missing_file(tmp_path, capsys):
    code = cli_main(
        ["reward", "--plugins", "./hooks/my_plugn.py", "--my_plugin_scale", "2", "--output_dir", str(tmp_path)]
    )
    line = error_line(capsys, code)
    assert "my_plugn.py" in line and "does not exist" in line


# ---------------------------------------------------------------- 9. one default model


def test_one_default_model():
    from perl_plugins.cli.train import _script_arguments
    from perl_plugins.models.embedded import ASSETS_BASE_DIR, load_default, resolve_model

    assert resolve_model(None) == str(ASSETS_BASE_DIR)
    assert _script_arguments()().model_size == "demo"
    model, _ = load_default()
    assert model.config.hidden_size == json.loads((ASSETS_BASE_DIR / "config.json").read_text())["hidden_size"]


# ---------------------------------------------------------------- 10. warnings and defaults


def test_disabled_plugin_named_explicitly_warns(make_trainer, monkeypatch):
    from perl_plugins import attach

    monkeypatch.setenv("PERL_PLUGINS_DISABLE", "grm")
    trainer = make_trainer("reward")
    with pytest.warns(UserWarning, match="PERL_PLUGINS_DISABLE"):
        attach(trainer, plugins="grm")
    assert not hasattr(trainer, "perl_plugins")


def test_plugins_from_the_environment_blocked_silently_is_not_a_warning(monkeypatch):
    from perl_plugins.host.registry import split_names

    monkeypatch.setenv("PERL_PLUGINS", "lora,grm")
    monkeypatch.setenv("PERL_PLUGINS_DISABLE", "grm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert split_names(None) == ["lora"]


def test_reward_evaluates_at_the_end_by_default(tmp_path, capsys):
    out = tmp_path / "rm"
    assert cli_main(["reward", "--plugins", "lora", "--output_dir", str(out), *TINY]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "eval_auc" in printed["metrics"] and "eval_accuracy" in printed["metrics"]
    assert cli_main(["reward", "--plugins", "lora", "--output_dir", str(out), *TINY, "--eval_strategy", "no"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"] == {}


def test_merged_export_loads_with_auto_classes_from_its_own_directory(tmp_path, capsys):
    """A checkpoint saved without ``--adapter_ckpt_save_tokenizer``: the merged export still carries
    the tokenizer (from the base), so AutoTokenizer + AutoModel* load it standalone."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "rm"
    assert (
        cli_main(
            [
                "reward",
                "--plugins",
                "lora,adapter_ckpt",
                "--output_dir",
                str(out),
                *TINY,
                "--save_strategy",
                "steps",
                "--save_steps",
                "1",
                "--eval_strategy",
                "no",
            ]
        )
        == 0
    )
    merged = tmp_path / "merged"
    assert cli_main(["export", str(out / "checkpoint-1"), "--merge", "--out", str(merged)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    with torch.no_grad():
        reward = model(**tokenizer(["User: a latte\nAgent: Sure."], return_tensors="pt")).logits
    assert reward.shape == (1, 1) and torch.isfinite(reward).all()
