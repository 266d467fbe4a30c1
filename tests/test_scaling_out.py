"""Scaling out: ``perl-plugins reward|dpo|rloo`` with plugins under 2-process DDP, DeepSpeed ZeRO-2
and ZeRO-3 on CPU (gloo), launched as users launch them (``accelerate launch`` with the shipped
``recipes/accelerate/*.yaml``), each with a save, an exact resume at world size 2, and cross-checks
of what ZeRO gathers against the same run under DDP.

ZeRO-3 runs use ``tests/ds_zero3_partition_all.json``: its persistence threshold 0 partitions every
tensor; ZeRO-3 would otherwise keep the tiny model's tensors (under 1e5 values) whole on each
process, and the gathering code would go untested.

``PERL_PLUGINS_TEST_FULL_MATRIX=1`` also runs every other (engine, command) pair with a resume,
ZeRO-1 (`accelerate launch --use_deepspeed --zero_stage 1`) with dpo, and the bf16 ZeRO-3 reward run
(shipped config) with its resume.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_multiprocess
from safetensors.torch import load_file

from perl_plugins.plugins.fp8.optim import FP8AdamW

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
ZERO3_JSON = ROOT / "tests" / "ds_zero3_partition_all.json"
STATE_DUMP = ROOT / "tests" / "plugins_for_tests" / "state_dump.py"
PLUGINS = {
    "reward": "lora,grm,fp8,adapter_ckpt",
    "dpo": "lora,fp8,adapter_ckpt",
    "rloo": "lora,fp8,adapter_ckpt",
    "sft": "lora,fp8,adapter_ckpt",
}
ARGS = {
    "reward": ["--per_device_train_batch_size", "4", "--max_train_samples", "64"],
    "dpo": ["--per_device_train_batch_size", "2", "--max_train_samples", "32", "--max_length", "128"],
    "rloo": [
        "--per_device_train_batch_size",
        "4",
        "--num_generations",
        "4",
        "--max_completion_length",
        "12",
        "--max_train_samples",
        "32",
    ],
    "sft": ["--per_device_train_batch_size", "2", "--max_train_samples", "16", "--max_length", "64"],
}
# On CPU, fp32 unless a test asks for bf16; 4 steps with checkpoints at 2 and 4.
COMMON = [
    "--use_cpu",
    "true",
    "--max_steps",
    "4",
    "--save_steps",
    "2",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--eval_strategy",
    "no",
    "--disable_tqdm",
    "true",
    "--learning_rate",
    "1e-3",
]
ADAPTER = Path("adapters") / "default" / "adapter_model.safetensors"


@dataclass
class Run:
    out: Path
    wall_s: float

    def log(self, checkpoint: str = "checkpoint-4") -> list[dict]:
        state = json.loads((self.out / checkpoint / "trainer_state.json").read_text())
        return [entry for entry in state["log_history"] if "loss" in entry]

    def manifest(self, checkpoint: str = "checkpoint-2") -> dict:
        return json.loads((self.out / checkpoint / "perl_manifest.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(engine: str, precision: str) -> list[str]:
    if engine == "single":
        return [sys.executable, "-m"]
    accelerate = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--num_processes",
        "2",
        "--mixed_precision",
        precision,
        "--main_process_port",
        str(_free_port()),
    ]
    if engine == "zero3":
        return [*accelerate, "--use_deepspeed", "--deepspeed_config_file", str(ZERO3_JSON), "-m"]
    if engine == "zero1":
        return [*accelerate, "--use_deepspeed", "--zero_stage", "1", "-m"]
    config = {"ddp": "ddp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3_yaml": "deepspeed_zero3.yaml"}[engine]
    return [*accelerate, "--config_file", str(CONFIGS / config), "-m"]


class Launcher:
    """Runs each named launch once per test session (later tests reuse earlier runs)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[str, Run] = {}

    def __call__(
        self,
        name: str,
        engine: str,
        command: str,
        *extra: str,
        plugins: str | None = None,
        resume: Path | None = None,
        expect_failure: bool = False,
        bf16: bool = False,
    ) -> Run | str:
        if name in self.runs:
            return self.runs[name]
        out = self.root / name
        argv = [
            *_launcher(engine, "bf16" if bf16 else "no"),
            "perl_plugins.cli",
            command,
            "--plugins",
            plugins or PLUGINS[command],
            *ARGS[command],
            *COMMON,
            "--bf16",
            str(bf16).lower(),
            "--output_dir",
            str(out),
            *extra,
        ]
        if resume is not None:
            argv += ["--resume_from_checkpoint", str(resume)]
        # One inductor compile thread: FP8AdamW's compiled step would otherwise start a pool of compile
        # workers in each process, on a 2-core machine.
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TORCHINDUCTOR_COMPILE_THREADS": "1",
            "PERL_PLUGINS_CACHE": str(self.root / "cache"),
        }
        start = time.perf_counter()
        if expect_failure:
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        else:
            proc = run_multiprocess(argv, out, cwd=ROOT, env=env, timeout=600)
        wall = time.perf_counter() - start
        if expect_failure:
            assert proc.returncode != 0, f"{name} should have failed"
            return proc.stdout + proc.stderr
        if proc.returncode != 0:
            pytest.fail(
                f"{name} ({engine} {command}) failed with {proc.returncode} after {wall:.0f}s:\n{proc.stderr[-6000:]}"
            )
        print(f"[scaling-out] {name}: {wall:.1f}s wall")
        self.runs[name] = Run(out, wall)
        return self.runs[name]


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Launcher:
    return Launcher(tmp_path_factory.mktemp("scaling_out"))


def assert_resumed_exactly(full: Run, resumed: Run) -> None:
    """The resumed run logged the same steps 3-4 and ended with bitwise-equal adapters."""
    steps = [(e["step"], e["loss"]) for e in full.log()]
    assert [(e["step"], e["loss"]) for e in resumed.log()] == steps and len(steps) == 4
    a, b = load_file(full.out / "checkpoint-4" / ADAPTER), load_file(resumed.out / "checkpoint-4" / ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _moments(state: dict) -> dict[str, torch.Tensor]:
    """A per-parameter FP8AdamW state (any layout) in full precision."""
    optimizer = FP8AdamW([torch.zeros(state["exp_avg"].numel())])
    param = optimizer.param_groups[0]["params"][0]
    optimizer.state[param] = state
    return optimizer.dequantized_state(param)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / a.norm().clamp_min(1e-300)).item()


def assert_gathered_like_ddp(ddp_checkpoint: Path, zero_checkpoint: Path) -> None:
    """ZeRO's gathered adapters and optimizer.pt hold what the same 2 steps under DDP hold, up to
    FP8 rounding. DDP keeps these small tensors' moments in fp32 (under ``fp8_min_numel``); ZeRO's
    flat partition is compressed, each tensor's fragment with its own scales (set_segments), so
    they differ by E4M3 rounding of m (at most 2**-4 relative per value at a tight scale) and fp16
    rounding of v (2**-11). Measured, m / v: ZeRO-2 dpo 0.034 / 0.0003, ZeRO-3 reward 0.041 / 0.0003
    with fresh scales; 0.067 / 0.0003 (ZeRO-3 reward) with FP8AdamW's delayed scaling, whose scale is
    an upper bound of the new amax (values sit lower in E4M3's range). With one scale per flat
    partition ZeRO-3 reward gave 0.176 / 0.004; a misplaced fragment would differ by ~140%
    (uncorrelated values)."""
    a, b = load_file(ddp_checkpoint / ADAPTER), load_file(zero_checkpoint / ADAPTER)
    assert a.keys() == b.keys()
    assert max(_relative(a[k], b[k]) for k in a) < 0.05
    ddp = torch.load(ddp_checkpoint / "optimizer.pt", weights_only=True)
    zero = torch.load(zero_checkpoint / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in ddp["param_groups"]] == [len(g["params"]) for g in zero["param_groups"]]
    assert ddp["state"].keys() == zero["state"].keys() and ddp["state"]
    worst = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
    for index, state in ddp["state"].items():
        m_ddp, m_zero = _moments(state), _moments(zero["state"][index])
        assert m_zero["step"] == m_ddp["step"] == 2
        for key in worst:
            worst[key] = max(worst[key], _relative(m_ddp[key], m_zero[key]))
    print(f"[scaling-out] largest ZeRO-vs-DDP moment difference: {worst}")
    assert worst["exp_avg"] < 2**-3 and worst["exp_avg_sq"] < 2**-10, worst


# ---------------------------------------------------------------- DDP


def test_ddp_reward_saves_once_per_checkpoint_and_resumes_exactly(launch: Launcher) -> None:
    full = launch("ddp_reward", "ddp", "reward")
    resumed = launch("ddp_reward_resumed", "ddp", "reward", resume=full.out / "checkpoint-2")
    assert_resumed_exactly(full, resumed)
    manifest = full.manifest()
    assert (manifest["engine"], manifest["world_size"]) == ("ddp", 2)
    files = set(manifest["files"])
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "scheduler.pt", str(ADAPTER)} <= files
    assert "rng_state.pth" not in files and not list(full.out.glob(".tmp-*"))
    assert {"reward_loss", "grm_reg_loss"} <= full.log()[0].keys()


def test_ddp_rloo_with_fp8_comm_and_shared_base_reward_resumes_exactly(launch: Launcher) -> None:
    reward = launch("ddp_reward", "ddp", "reward")  # a LoRA reward adapter on the same base
    extra = ("--reward_adapter", str(reward.out), "--fp8_comm", "true")
    full = launch("ddp_rloo", "ddp", "rloo", *extra)
    resumed = launch("ddp_rloo_resumed", "ddp", "rloo", *extra, resume=full.out / "checkpoint-2")
    assert_resumed_exactly(full, resumed)
    ratios = [e["fp8/comm_bytes_ratio"] for e in full.log()]
    assert ratios and all(0.24 < r < 0.26 for r in ratios)  # FP8 payload: a quarter of fp32
    assert set(full.manifest()["plugins"]) == {"lora", "fp8", "adapter_ckpt"}


def test_processes_share_one_freshly_written_embedded_model(launch: Launcher) -> None:
    """Both processes resolve the random-init embedded model into an empty cache at once: the first
    writes it, the other waits and loads the same complete copy."""
    run = launch("ddp_sft_tiny", "ddp", "sft", "--model_size", "tiny")
    models = list((launch.root / "cache").glob("model-tiny-*"))
    assert len(models) == 1 and {"config.json", "model.safetensors"} <= {f.name for f in models[0].iterdir()}
    assert [e["step"] for e in run.log()] == [1, 2, 3, 4]


# ---------------------------------------------------------------- DeepSpeed ZeRO-2


def test_zero2_dpo_with_fp8adamw_resumes_exactly_and_gathers_like_ddp(launch: Launcher) -> None:
    full = launch("zero2_dpo", "zero2", "dpo")
    resumed = launch("zero2_dpo_resumed", "zero2", "dpo", resume=full.out / "checkpoint-2")
    assert_resumed_exactly(full, resumed)
    checkpoint = full.out / "checkpoint-2"
    assert (full.manifest()["engine"], full.manifest()["portable_optimizer"]) == ("deepspeed_zero2", True)
    assert len(list((checkpoint / "global_step2").glob("*optim_states.pt"))) == 2  # one shard per process
    ddp = launch("ddp_dpo", "ddp", "dpo")
    assert [e["loss"] for e in ddp.log()][:2] == pytest.approx([e["loss"] for e in full.log()][:2], rel=1e-4)
    assert_gathered_like_ddp(ddp.out / "checkpoint-2", checkpoint)


# ---------------------------------------------------------------- DeepSpeed ZeRO-3


def test_zero3_reward_resumes_exactly_and_gathers_like_ddp(launch: Launcher) -> None:
    full = launch("zero3_reward", "zero3", "reward")
    resumed = launch("zero3_reward_resumed", "zero3", "reward", resume=full.out / "checkpoint-2")
    assert_resumed_exactly(full, resumed)
    assert full.manifest()["engine"] == "deepspeed_zero3"
    ddp = launch("ddp_reward", "ddp", "reward")
    assert [e["loss"] for e in ddp.log()] == pytest.approx([e["loss"] for e in full.log()], rel=1e-4)
    assert_gathered_like_ddp(ddp.out / "checkpoint-2", full.out / "checkpoint-2")
    # The final reward adapter, gathered from ZeRO-3 shards, is a whole adapter with its head spec.
    final = load_file(full.out / "adapter_model.safetensors")
    assert final.keys() == load_file(full.out / "checkpoint-4" / ADAPTER).keys()
    assert all(t.numel() > 0 for t in final.values()) and (full.out / "perl_reward_head.json").is_file()


def test_zero3_checkpoint_resumes_on_one_process_without_deepspeed(launch: Launcher) -> None:
    full = launch("zero3_reward", "zero3", "reward")
    checkpoint = full.out / "checkpoint-2"
    single = launch(
        "zero3_reward_on_one_process",
        "single",
        "reward",
        plugins=f"{PLUGINS['reward']},{STATE_DUMP}",
        resume=checkpoint,
    )
    dump = torch.load(single.out / "state_at_train_begin.pt", weights_only=True)
    assert dump["world_size"] == 1
    # The gathered adapters and optimizer state are what this process started from.
    adapters = load_file(checkpoint / ADAPTER)
    params = {n.replace(".modules_to_save", "").replace(".default", ""): t for n, t in dump["params"].items()}
    assert params.keys() == adapters.keys() and all(torch.equal(params[k], adapters[k]) for k in adapters)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert dump["optimizer"]["state"].keys() == saved["state"].keys()
    for index, state in saved["state"].items():
        loaded = dump["optimizer"]["state"][index]
        assert all(torch.equal(loaded[k], v) if torch.is_tensor(v) else loaded[k] == v for k, v in state.items())
    steps = [e["step"] for e in single.log()]
    assert steps == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(e["loss"])) for e in single.log())


def test_zero3_bf16_with_the_shipped_config_keeps_fp32_masters(launch: Launcher) -> None:
    """bf16 under ZeRO-3: the base is partitioned in bf16 at load; the lora plugin casts the new
    adapters and heads to bf16 too (ZeRO-3 needs one dtype), and checkpoints keep fp32 masters.
    Its exact resume is in the opt-in matrix (ZeRO-3's resume runs in CI in fp32, above)."""
    full = launch("zero3_yaml_reward", "zero3_yaml", "reward", bf16=True)  # the matrix reuses it by name
    losses = [e["loss"] for e in full.log()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert {t.dtype for t in load_file(full.out / "checkpoint-2" / ADAPTER).values()} == {torch.float32}


def test_deepspeed_refuses_a_checkpoint_it_cannot_resume(launch: Launcher) -> None:
    ddp = launch("ddp_reward", "ddp", "reward")
    output = launch("zero2_resumes_ddp", "zero2", "reward", resume=ddp.out / "checkpoint-2", expect_failure=True)
    assert "was written by ddp at world size 2" in output and "DeepSpeed resumes only its own" in output


# ---------------------------------------------------------------- the rest of the matrix (opt-in)

_IN_CI = {("ddp", "reward"), ("ddp", "rloo"), ("zero2", "dpo"), ("zero3", "reward")}
_MATRIX = [(e, c) for e in ("ddp", "zero2", "zero3") for c in ("reward", "dpo", "rloo") if (e, c) not in _IN_CI]
_MATRIX += [("zero1", "dpo"), ("zero3_yaml", "reward")]  # the last: bf16 with the shipped ZeRO-3 config


@pytest.mark.skipif(not os.environ.get("PERL_PLUGINS_TEST_FULL_MATRIX"), reason="set PERL_PLUGINS_TEST_FULL_MATRIX=1")
@pytest.mark.parametrize(("engine", "command"), _MATRIX)
def test_matrix_resumes_exactly(launch: Launcher, engine: str, command: str) -> None:
    extra: tuple[str, ...] = ()
    if command == "rloo":
        extra = ("--reward_adapter", str(launch("ddp_reward", "ddp", "reward").out))
    bf16 = engine == "zero3_yaml"
    full = launch(f"{engine}_{command}", engine, command, *extra, bf16=bf16)
    resumed = launch(
        f"{engine}_{command}_resumed", engine, command, *extra, bf16=bf16, resume=full.out / "checkpoint-2"
    )
    assert_resumed_exactly(full, resumed)
