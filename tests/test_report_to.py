"""Every named loss term and plugin metric reaches every ``report_to`` backend (here TensorBoard:
the event file holds them), and the CLI is quiet by default: a progress bar, not a dict per step."""

from __future__ import annotations

import ast
from pathlib import Path

from perl_plugins.cli import main as cli_main

RUN = [
    "reward",
    "--plugins",
    "lora,grm,fp8",
    "--model_size",
    "tiny",
    "--max_steps",
    "3",
    "--logging_steps",
    "1",
    "--per_device_train_batch_size",
    "4",
    "--max_train_samples",
    "16",
    "--max_eval_samples",
    "64",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "3",
    "--save_strategy",
    "no",
    "--use_cpu",
    "--disable_tqdm",
    "false",
]


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[float]] = {}
    for events in run_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend(event.value for event in accumulator.Scalars(tag))
    return found


def _printed_dicts(text: str) -> list[dict]:
    dicts = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{'") and line.endswith("}"):
            dicts.append(ast.literal_eval(line))
    return dicts


def test_loss_terms_and_plugin_metrics_reach_tensorboard_quietly(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main([*RUN, "--output_dir", str(out), "--report_to", "tensorboard"]) == 0
    scalars = _scalars(out)
    for tag in ("train/reward_loss", "train/grm_reg_loss", "train/loss"):
        assert len(scalars.get(tag, [])) == 3, (tag, sorted(scalars))  # one per logging step
    # The optimizer's skipped-step count rides on every log (steps, evaluation, the end of training).
    skips = scalars.get("train/fp8/nonfinite_skips", [])
    assert len(skips) >= 3 and set(skips) == {0.0}, sorted(scalars)
    assert "eval/reward_loss" in scalars and "eval/grm_reg_loss" in scalars
    # Quiet: no per-step dict on stdout, a short JSON summary at the end.
    printed = capsys.readouterr().out
    assert not [d for d in _printed_dicts(printed) if "loss" in d]
    assert printed.strip().splitlines()[-1].startswith('{"command": "reward"')


def test_log_level_info_prints_the_per_step_dicts(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*RUN, "--plugins", "lora", "--output_dir", str(out), "--report_to", "none", "--log_level", "info"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    steps = [d for d in _printed_dicts(captured.out + captured.err) if "loss" in d and "epoch" in d]
    assert len(steps) == 3
