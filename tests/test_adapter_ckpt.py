"""The ``adapter_ckpt`` plugin: checkpoint contents, exact resume, load errors, a kill mid-save,
``save_total_limit`` with the best checkpoint, and ``perl-plugins export``."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from adapter_ckpt_run import SAVE_STEPS, build, train
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from perl_plugins import PluginIncompatibleError, attach
from perl_plugins.checkpoint.store import (
    MANIFEST_NAME,
    SAVE_DELAY_ENV,
    BaseMismatchError,
    ChecksumMismatchError,
    IncompleteCheckpointError,
    MissingFileError,
    base_fingerprint,
    is_complete,
    latest_complete_checkpoint,
    verify_checkpoint,
)
from perl_plugins.cli import main as cli_main

TESTS_DIR = Path(__file__).resolve().parent
# Not restored by any resume, stock included: wall-clock step time, and the token counter that
# trl's Reward/DPO trainers keep in memory (self._total_train_tokens).
NOT_RESUMABLE = {"step_time", "num_tokens"}
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, perl_cache) -> Path:
    from perl_plugins.models.embedded import save_default

    return save_default(tmp_path_factory.mktemp("base"), "tiny")


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory, base_dir) -> Path:
    """A frozen LoRA reward adapter (with its score head) on the same base, for RLOO's AdapterReward."""
    from peft import LoraConfig, get_peft_model

    from perl_plugins.models.reward import save_reward_adapter

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", init_lora_weights=False
    )
    return save_reward_adapter(get_peft_model(model, config), tmp_path_factory.mktemp("reward_adapter"))


# Each case: trainer kind and build() keywords. "reward_full" is full fine-tuning (no LoRA); GRPO
# reuses a generation round for 2 steps, and SAVE_STEPS falls on a round boundary (see the warning
# test below); fp8 cases keep every optimizer state in FP8/FP16 (no size threshold, eager).
FP8 = dict(plugins="lora,fp8,adapter_ckpt", options={"fp8_min_numel": 0, "fp8_kernel": "cpp"})
CASES = {
    "reward": dict(kind="reward"),
    "reward_full": dict(kind="reward", plugins="adapter_ckpt"),
    "dpo": dict(kind="dpo", options={"adapter_ckpt_save_tokenizer": True}),
    "rloo": dict(kind="rloo", reward_adapter=True),
    "grpo": dict(kind="grpo", steps_per_generation=2),
    "reward_fp8": dict(kind="reward", **FP8),
    "dpo_fp8": dict(kind="dpo", **FP8),
    "rloo_fp8": dict(kind="rloo", reward_adapter=True, **FP8),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, base_dir, reward_adapter):
    """``uninterrupted(case) -> (trainer, logs, output_dir)``: one full run per case, saving every
    SAVE_STEPS steps, computed once and shared by the tests of this module."""
    runs = {}

    def get(case: str):
        if case not in runs:
            out = tmp_path_factory.mktemp(f"full_{case}")
            trainer = build(base_dir=base_dir, output_dir=out, **_kwargs(case, reward_adapter))
            runs[case] = (trainer, train(trainer), out)
        return runs[case]

    return get


def _kwargs(case: str, reward_adapter: Path) -> dict:
    kwargs = dict(CASES[case])
    if kwargs.pop("reward_adapter", False):
        from perl_plugins.plugins.lora import AdapterReward

        kwargs["reward_funcs"] = [AdapterReward(str(reward_adapter))]
    return kwargs


def _after(logs: list[dict], step: int) -> dict[int, dict]:
    return {entry["step"]: entry for entry in logs if entry["step"] > step}


def _assert_same_logs(expected: dict[int, dict], got: dict[int, dict]) -> None:
    assert list(got) == list(expected) and expected
    for step, entry in expected.items():
        for key, value in entry.items():
            if key not in NOT_RESUMABLE and isinstance(value, float):
                assert abs(got[step][key] - value) <= 1e-6, (step, key, value, got[step][key])


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- contents


def test_checkpoint_holds_only_trainable_tensors(uninterrupted, base_dir):
    _, _, out = uninterrupted("rloo")
    ckpt = out / f"checkpoint-{SAVE_STEPS}"
    assert _files(ckpt) == {
        "adapters/default/adapter_model.safetensors",
        "adapters/default/adapter_config.json",
        "adapters/reward/adapter_model.safetensors",
        "adapters/reward/adapter_config.json",
        "adapters/reward/perl_reward_head.json",  # how the frozen reward adapter scores (head, pad id)
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        MANIFEST_NAME,
    }  # no base weights, no tokenizer, no temp leftovers
    keys = {}
    for name in ("default", "reward"):
        with safe_open(str(ckpt / "adapters" / name / "adapter_model.safetensors"), framework="pt") as f:
            keys[name] = set(f.keys())
        assert all("lora_" in k or ".score." in k for k in keys[name]), keys[name]
    assert any(".score." in k for k in keys["reward"])  # the frozen reward role keeps its head
    assert json.loads((ckpt / "adapters/reward/adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    manifest = verify_checkpoint(ckpt)  # every file listed with its sha256, all match
    assert set(manifest["files"]) == _files(ckpt) - {MANIFEST_NAME}
    assert manifest["trainer_class"].endswith("RLOOTrainer") and manifest["global_step"] == SAVE_STEPS
    assert manifest["plugins"]["lora"]["lora_r"] == 16 and "adapter_ckpt" in manifest["plugins"]
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["library_versions"])
    fresh_base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert manifest["base_fingerprint"]["id"] == base_fingerprint(fresh_base)["id"]
    assert manifest["model"]["adapters"] == {"default": {"trainable": True}, "reward": {"trainable": False}}
    # Everything that is not safetensors loads without unpickling arbitrary objects.
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.load(ckpt / name, weights_only=True)
    adapter_bytes = sum((ckpt / "adapters" / n / "adapter_model.safetensors").stat().st_size for n in keys)
    base_bytes = sum(p.numel() * p.element_size() for p in fresh_base.parameters())
    assert adapter_bytes < base_bytes / 2


def test_full_fine_tuning_and_tokenizer(uninterrupted):
    _, _, out = uninterrupted("reward_full")
    assert _files(out / "checkpoint-2") == {
        "trainable.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        MANIFEST_NAME,
    }
    _, _, out = uninterrupted("dpo")
    assert "tokenizer/tokenizer.json" in _files(out / "checkpoint-2")  # adapter_ckpt_save_tokenizer


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("case", list(CASES))
def test_resume_matches_uninterrupted_run(case, uninterrupted, base_dir, reward_adapter, tmp_path):
    _, full_logs, out = uninterrupted(case)
    checkpoint = out / f"checkpoint-{SAVE_STEPS}"
    resumed = build(base_dir=base_dir, output_dir=tmp_path, **_kwargs(case, reward_adapter))
    logs = train(resumed, str(checkpoint))
    _assert_same_logs(_after(full_logs, SAVE_STEPS), _after(logs, SAVE_STEPS))
    if case.endswith("fp8"):  # compact optimizer states are saved and resumed as they are
        saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
        assert {v.dtype for state in saved.values() for v in state.values() if torch.is_tensor(v)} >= {
            torch.float8_e4m3fn,
            torch.float16,
        }
        optimizer = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
        assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {torch.float8_e4m3fn}


def test_warns_when_checkpoints_split_a_generation_round(base_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="perl_plugins.plugins.adapter_ckpt"):
        build("grpo", base_dir, tmp_path, steps_per_generation=2, save_steps=1)
    assert "inside a generation round" in caplog.text


# ---------------------------------------------------------------- load errors


@pytest.fixture
def reward_checkpoint(uninterrupted, tmp_path) -> Path:
    _, _, out = uninterrupted("reward")
    return Path(shutil.copytree(out / f"checkpoint-{SAVE_STEPS}", tmp_path / f"checkpoint-{SAVE_STEPS}"))


def _resume_error(base_dir: Path, checkpoint: Path, error: type[Exception]) -> Exception:
    trainer = build("reward", base_dir, checkpoint.parent / "resumed")
    with pytest.raises(error) as caught:
        train(trainer, str(checkpoint))
    assert trainer.state.global_step == 0  # refused before training resumed
    return caught.value


def test_corrupt_file_is_named(reward_checkpoint, base_dir):
    file = reward_checkpoint / "adapters/default/adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    error = _resume_error(base_dir, reward_checkpoint, ChecksumMismatchError)
    assert "adapters/default/adapter_model.safetensors" in str(error)


def test_missing_file_is_named(reward_checkpoint, base_dir):
    (reward_checkpoint / "optimizer.pt").unlink()
    error = _resume_error(base_dir, reward_checkpoint, MissingFileError)
    assert "optimizer.pt" in str(error)


def test_incomplete_checkpoint_is_refused(reward_checkpoint, base_dir):
    (reward_checkpoint / MANIFEST_NAME).unlink()
    _resume_error(base_dir, reward_checkpoint, IncompleteCheckpointError)


def test_other_base_is_refused(reward_checkpoint, base_dir, tmp_path):
    from perl_plugins.models.embedded import save_default

    other_base = save_default(tmp_path / "other_base", "tiny", seed=1)
    error = _resume_error(other_base, reward_checkpoint, BaseMismatchError)
    assert str(base_dir) in str(error) and "weight values" in str(error)  # names the base it expects


def test_refuses_fsdp(make_trainer):
    trainer = make_trainer("trainer", max_steps=1)
    trainer.is_fsdp_enabled = True
    with pytest.raises(PluginIncompatibleError, match="adapter_ckpt.*FSDP"):
        attach(trainer, plugins="adapter_ckpt")


# ---------------------------------------------------------------- crash safety and pruning


def test_kill_mid_save_keeps_last_complete_checkpoint(uninterrupted, base_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, SAVE_DELAY_ENV: "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "adapter_ckpt_run.py"), "reward", str(base_dir), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not [p for p in out.glob(".tmp-checkpoint-4-*") if any(p.iterdir())]:  # second save under way
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its second save"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "checkpoint-4").exists()
    assert not [p for p in out.iterdir() if is_complete(p) and p.name != "checkpoint-2"]
    verify_checkpoint(out / "checkpoint-2")
    assert latest_complete_checkpoint(out) == out / "checkpoint-2" == Path(get_last_checkpoint(str(out)))

    resumed = build("reward", base_dir, out, save_total_limit=1)
    logs = train(resumed, True)  # stock "latest checkpoint"
    _assert_same_logs(_after(uninterrupted("reward")[1], SAVE_STEPS), _after(logs, SAVE_STEPS))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]  # older one and crash debris pruned


def test_save_total_limit_keeps_best_checkpoint(base_dir, tmp_path):
    trainer = build(
        "reward",
        base_dir,
        tmp_path,
        evaluate=True,
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )  # "best" = highest loss: an early checkpoint, which takes one of the limit's two places
    train(trainer)
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([best.name, "checkpoint-4"])
    with safe_open(str(best / "adapters/default/adapter_model.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    from perl_plugins.checkpoint.model_state import adapter_state

    loaded = adapter_state(trainer.model, "default")  # load_best_model_at_end restored the best adapter
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


# ---------------------------------------------------------------- export


def test_export_adapter_and_merged(uninterrupted, base_dir, tmp_path):
    from peft import PeftModel

    trainer, _, out = uninterrupted("dpo")
    ckpt = out / "checkpoint-4"  # the trained model's final state
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=IDS).logits

        assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "adapter")]) == 0
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
        assert torch.allclose(adapter.eval()(input_ids=IDS).logits, expected, atol=1e-6)

        assert cli_main(["export", str(ckpt), "--merge", "--out", str(tmp_path / "merged")]) == 0
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert not any("lora" in name for name, _ in merged.named_parameters())
        assert torch.allclose(merged.eval()(input_ids=IDS).logits, expected, atol=1e-5)
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "merged").pad_token
        == AutoTokenizer.from_pretrained(base_dir).pad_token
    )


def test_export_reward_adapter_keeps_head(uninterrupted, base_dir, tmp_path):
    from peft import PeftModel

    trainer, _, out = uninterrupted("reward")
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=IDS).logits
        assert cli_main(["export", str(out / "checkpoint-4"), "--out", str(tmp_path / "adapter")]) == 0
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
        adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert torch.allclose(adapter.eval()(input_ids=IDS).logits, expected, atol=1e-6)


def test_export_merge_refuses_other_base(uninterrupted, tmp_path, capsys):
    from perl_plugins.models.embedded import save_default

    _, _, out = uninterrupted("dpo")
    other = save_default(tmp_path / "other_base", "tiny", seed=1)
    argv = ["export", str(out / "checkpoint-4"), "--merge", "--base", str(other), "--out", str(tmp_path / "m")]
    assert cli_main(argv) == 2
    assert "was saved for base model" in capsys.readouterr().err


def _run_like(engine: str, world_size: int) -> SimpleNamespace:
    """What check_resume_engine reads of a trainer: its DeepSpeed stage (if any) and world size."""
    stage = int(engine.removeprefix("deepspeed_zero")) if engine.startswith("deepspeed") else None
    plugin = SimpleNamespace(zero_stage=stage)
    return SimpleNamespace(
        is_deepspeed_enabled=stage is not None,
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        args=SimpleNamespace(world_size=world_size, save_only_model=False),
    )


@pytest.mark.parametrize(
    ("saved", "current", "has_optimizer", "error"),
    [
        (("deepspeed_zero3", 2), ("deepspeed_zero3", 2), True, None),
        (("deepspeed_zero3", 2), ("single", 1), True, None),  # adapters + gathered optimizer.pt
        (("deepspeed_zero2", 2), ("ddp", 4), True, None),
        (("ddp", 2), ("single", 1), True, None),
        (("deepspeed_zero3", 2), ("deepspeed_zero3", 1), True, "written by deepspeed_zero3 at world size 2"),
        (("deepspeed_zero2", 2), ("deepspeed_zero3", 2), True, "same ZeRO stage and world size"),
        (("ddp", 2), ("deepspeed_zero2", 2), True, "written by ddp at world size 2"),
        (("deepspeed_zero2", 2), ("single", 1), False, "adapter_ckpt_portable_optimizer=false"),
    ],
)
def test_resume_engine_rules(tmp_path, saved, current, has_optimizer, error):
    from perl_plugins.checkpoint.store import CheckpointError
    from perl_plugins.plugins.adapter_ckpt import check_resume_engine

    if has_optimizer:
        (tmp_path / "optimizer.pt").write_bytes(b"")
    manifest = {"engine": saved[0], "world_size": saved[1], "portable_optimizer": has_optimizer}
    if error is None:
        check_resume_engine(_run_like(*current), tmp_path, manifest)
    else:
        with pytest.raises(CheckpointError, match=re.escape(error)):
            check_resume_engine(_run_like(*current), tmp_path, manifest)


def test_deepspeed_without_zero_needs_the_portable_optimizer_off():
    from perl_plugins.plugins.adapter_ckpt import AdapterCkptOptions, perl_check_trainer

    trainer = _run_like("deepspeed_zero0", 2)
    trainer.args.save_on_each_node = False
    with pytest.raises(PluginIncompatibleError, match="stage 0"):
        perl_check_trainer(trainer, {"adapter_ckpt": AdapterCkptOptions()})
    perl_check_trainer(trainer, {"adapter_ckpt": AdapterCkptOptions(adapter_ckpt_portable_optimizer=False)})


def test_export_merge_refuses_a_grm_reward_model(uninterrupted, tmp_path, capsys):
    _, _, out = uninterrupted("reward")
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(out / "checkpoint-4", ckpt)
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["plugins"]["grm"] = {"grm_head": "mlp"}  # metadata only: the files' hashes still verify
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert cli_main(["export", str(ckpt), "--merge", "--out", str(tmp_path / "merged")]) == 2
    assert "trained with the grm plugin" in capsys.readouterr().err
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "adapter")]) == 0  # the adapter still exports
