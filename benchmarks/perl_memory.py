"""PERL's memory and speed claims on a Llama built from config (random weights): ~100M parameters
(``--size bench100m``, a fast look) or ~0.5B (``--size bench500m``, where weights, gradients and
optimizer states dominate, as on a real run).

Five cases, each in its own process (peak RSS = that process's VmHWM), alternated over rounds
(odd rounds in reverse order), same data, batch and sequence length:

- ``rm_lora`` / ``rm_full``: pointwise reward-model training (stock ``Trainer``, BCE on the reward
  logit) through the ``lora`` plugin vs full fine-tuning (AdamW states for every parameter).
- ``rl_shared``: RLOO, LoRA policy, reward = ``AdapterReward`` (a reward adapter on the policy's base).
- ``rl_separate``: the same, reward = a separate full reward model (the adapter merged into a copy).
- ``rl_policy_only``: the same, constant reward function (no reward model at all).

All RL cases use a LoRA policy, so the reference is the base with adapters off everywhere (trl
loads no reference copy), and trl's RL default of gradient checkpointing (what ``perl-plugins rloo``
runs; ``--rl_gradient_checkpointing false`` keeps every activation instead). The last line printed
is JSON with the medians per case and the ratios
``rm_lora_vs_full_peak_ratio`` (goal <= 0.5; bench500m 0.35), ``rm_lora_vs_full_step_ratio`` (<= 0.7;
0.5), ``rl_shared_vs_separate_peak_ratio`` (<= 0.6), ``rl_shared_vs_policy_only_peak_ratio`` (<= 1.15;
1.02); the same peak ratios above the idle process (``above_idle``: interpreter + libraries loaded,
no model); per case a breakdown of the peak from tensors (weights, gradients, optimizer states,
activations the loss saved for backward), the peak split into anonymous and file-backed pages, and
the peak RSS in each training phase (generation, reward, log-prob passes, forward + backward,
optimizer step; RSS sampled every 5 ms).

    python benchmarks/perl_memory.py [--size bench500m] [--rounds 2] [--steps 3] [--batch_size 4] [--seq_len 128] \
        [--rl_gradient_checkpointing true]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

from _common import StepTimer, median, peak_rss_mb, ratio, reset_peak_rss, rss_mb, run_json  # noqa: E402

CASES = ("rm_lora", "rm_full", "rl_shared", "rl_separate", "rl_policy_only")
GOALS = {
    "rm_lora_vs_full_peak_ratio": 0.5,
    "rm_lora_vs_full_step_ratio": 0.7,
    "rl_shared_vs_separate_peak_ratio": 0.6,
    "rl_shared_vs_policy_only_peak_ratio": 1.15,
}
# At ~0.5B parameters weights, gradients and optimizer states dominate, as in a real run: tighter goals.
GOALS_BY_SIZE = {
    "bench500m": {
        "rm_lora_vs_full_peak_ratio": 0.35,
        "rm_lora_vs_full_step_ratio": 0.5,
        "rl_shared_vs_separate_peak_ratio": 0.6,
        "rl_shared_vs_policy_only_peak_ratio": 1.02,
    }
}
WARMUP_STEPS = 1  # the first step allocates optimizer states and warms allocator caches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds over all cases.")
    parser.add_argument("--steps", type=int, default=3, help="Timed reward-model steps (after one warm-up step).")
    parser.add_argument(
        "--rl_steps", type=int, default=1, help="Timed RL steps (after one warm-up step); RL goals are peaks only."
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per case (1 stays steady on a shared machine)."
    )
    parser.add_argument("--batch_size", type=int, default=4, help="Sequences per step (RL: completions).")
    parser.add_argument("--seq_len", type=int, default=128, help="Tokens per sequence (RL: prompt + completion).")
    parser.add_argument("--completion_length", type=int, default=16, help="RL: new tokens per completion.")
    parser.add_argument("--size", default="bench100m", help="perl_plugins.models.embedded.tiny_config size.")
    parser.add_argument(
        "--rl_gradient_checkpointing",
        choices=("true", "false"),
        default="true",
        help="RL cases: recompute activations in backward (trl's RLOO default, what `perl-plugins rloo` runs).",
    )
    parser.add_argument("--case", choices=("setup", *CASES), help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- worker side (one case per process)


def _mb(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)


def _rss_parts() -> dict[str, float]:
    """RSS now, MiB, and its anonymous / file-backed parts (memory-mapped weights are file pages)."""
    wanted = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    with open("/proc/self/status") as f:
        return {wanted[line.split()[0]]: float(line.split()[1]) / 1024 for line in f if line.split()[0] in wanted}


class TensorBytes:
    """Where memory goes, from tensors (not RSS), at the end of each optimizer step (gradients and
    optimizer states both alive): weights (trainable / frozen) of every model the trainer holds,
    gradients, optimizer states. Each storage counts once (a shared base is one base)."""

    def __init__(self) -> None:
        self.peak: dict[str, float] = {}

    @staticmethod
    def _modules(trainer: Any) -> list[Any]:
        import torch.nn as nn

        found = [trainer.model, getattr(trainer, "ref_model", None), *(getattr(trainer, "reward_funcs", None) or [])]
        return [m for m in found if isinstance(m, nn.Module)]

    def measure(self, trainer: Any) -> None:
        import torch

        seen: set[int] = set()

        def size(t: torch.Tensor) -> int:
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or t.device.type == "meta":
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()

        counts = {"weights_trainable": 0, "weights_frozen": 0, "buffers": 0, "grads": 0, "optimizer_states": 0}
        for module in self._modules(trainer):
            for p in module.parameters():  # reward models and references never train
                trains = p.requires_grad and module is trainer.model
                counts["weights_trainable" if trains else "weights_frozen"] += size(p)
                if p.grad is not None:
                    counts["grads"] += size(p.grad)
            counts["buffers"] += sum(size(b) for b in module.buffers())
        optimizer = trainer.optimizer
        while getattr(optimizer, "optimizer", None) is not None:  # accelerate's wrapper
            optimizer = optimizer.optimizer
        for state in optimizer.state.values():
            counts["optimizer_states"] += sum(size(v) for v in state.values() if torch.is_tensor(v))
        for key, n in counts.items():
            self.peak[key] = max(self.peak.get(key, 0.0), _mb(n))


class SavedActivations:
    """Bytes autograd keeps for backward during the loss forward (each storage once, parameters
    excluded), the largest over steps: ``lora`` what LoRA's own modules save (dropout masks and
    copies, the adapters' inputs and outputs), ``base`` the rest. Under gradient checkpointing the
    blocks' activations are recomputed in backward: only what runs outside them is seen here."""

    def __init__(self) -> None:
        self.peak: dict[str, float] = {"lora": 0.0, "base": 0.0}

    def trace(self, trainer: Any) -> None:
        compute_loss = trainer.compute_loss

        def traced(*args: Any, **kwargs: Any) -> Any:
            import torch

            model = trainer.model
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            seen: set[int] = set()
            counts = {"lora": 0, "base": 0}
            depth = [0]  # > 0 while a LoRA submodule runs

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage.data_ptr() not in params and storage.data_ptr() not in seen and t.device.type != "meta":
                    seen.add(storage.data_ptr())
                    counts["lora" if depth[0] else "base"] += storage.nbytes()
                return t

            handles = []
            for name, module in model.named_modules():
                parts = name.split(".")
                if len(parts) > 1 and parts[-2] in ("lora_A", "lora_B", "lora_dropout"):
                    handles.append(module.register_forward_pre_hook(lambda *a: depth.__setitem__(0, depth[0] + 1)))
                    handles.append(module.register_forward_hook(lambda *a: depth.__setitem__(0, depth[0] - 1)))
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    return compute_loss(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
                for key, n in counts.items():
                    self.peak[key] = max(self.peak[key], _mb(n))

        trainer.compute_loss = traced


class PhaseRss(threading.Thread):
    """Samples this process's RSS every few ms during training. Per phase (a wrapped trainer
    method) it keeps the peak RSS while it runs and its growth: peak during a call minus RSS when
    the call began, the largest over calls (torch kernels release the GIL, so samples land inside
    them; a phase's growth includes the phases it calls). ``at_peak`` splits the highest sample
    into anonymous memory and file-backed pages (the memory-mapped weights)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.frames: list[list[Any]] = []  # [label, RSS at entry, peak so far] of the calls running
        self.peak: dict[str, float] = {}
        self.growth: dict[str, float] = {}
        self.at_peak: dict[str, float] = {"rss": 0.0}
        self.running = True

    def run(self) -> None:
        while self.running:
            parts = _rss_parts()
            now = parts["rss"]
            if now > self.at_peak["rss"]:
                self.at_peak = {k: round(v, 1) for k, v in parts.items()}
            for frame in list(self.frames):
                frame[2] = max(frame[2], now)
            time.sleep(self.interval_s)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        method = getattr(owner, name, None)
        if method is None:
            return

        def traced(*args: Any, **kwargs: Any) -> Any:
            entry = rss_mb()
            frame = [label, entry, entry]
            self.frames.append(frame)
            try:
                return method(*args, **kwargs)
            finally:
                self.frames.remove(frame)
                peak = max(frame[2], rss_mb())
                self.peak[label] = round(max(self.peak.get(label, 0.0), peak), 1)
                self.growth[label] = round(max(self.growth.get(label, 0.0), peak - entry), 1)

        setattr(owner, name, traced)

    def trace(self, trainer: Any) -> None:
        """Every case: the training step (RL: generation and scoring included) and the optimizer
        step (wrapped once the trainer builds it); RL: generation, reward scoring, log-prob passes
        (old / reference policy while scoring, and in the loss), and the loss (forward) alone."""
        self.wrap(trainer, "_generate", "generate")
        self.wrap(trainer, "_calculate_rewards", "reward")
        self.wrap(trainer, "_get_per_token_logps_and_entropies", "logps")
        self.wrap(trainer, "training_step", "training_step")
        if hasattr(trainer, "_generate_and_score_completions"):
            self.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
            self.wrap(trainer, "compute_loss", "loss_forward")
        create = trainer.create_optimizer

        def create_optimizer(*args: Any, **kwargs: Any) -> Any:
            optimizer = create(*args, **kwargs)
            self.wrap(optimizer, "step", "optimizer_step")
            return optimizer

        trainer.create_optimizer = create_optimizer


def _reward_rows(tokenizer: Any, count: int, seq_len: int):
    """Pointwise Taskmaster rows at least ``seq_len`` tokens long: after the pointwise trainer cuts
    the oldest context, every batch is exactly (batch, seq_len) in both RM cases."""
    from perl_plugins.data.defaults import default_dataset

    rows = default_dataset("reward")["train"]
    rows = rows.filter(lambda r: len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) >= seq_len)
    return rows.select(range(count))


def _reward_trainer(base: str, tokenizer: Any, args: argparse.Namespace, workdir: str, steps: int, lora: bool):
    from transformers import TrainingArguments

    from perl_plugins import attach
    from perl_plugins.training.pointwise import pointwise_trainer, reward_classifier

    train_args = TrainingArguments(
        output_dir=os.path.join(workdir, "rm_run"),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    rows = _reward_rows(tokenizer, steps * args.batch_size, args.seq_len)
    trainer = pointwise_trainer(reward_classifier(base), tokenizer, train_args, rows, max_length=args.seq_len)
    return attach(trainer, plugins="lora") if lora else trainer


def _constant_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    return [0.0] * len(completions)


def _rl_trainer(case: str, base: str, tokenizer: Any, args: argparse.Namespace, workdir: str, steps: int):
    from transformers import AutoModelForCausalLM
    from trl import RLOOConfig, RLOOTrainer

    from perl_plugins import attach
    from perl_plugins.data.defaults import default_dataset
    from perl_plugins.data.text import trim_prompts
    from perl_plugins.plugins.lora import AdapterReward, LoraOptions, lora_config
    from perl_plugins.training.pointwise import reward_classifier

    prompts = default_dataset("rloo")["train"].select(range(steps * args.batch_size))
    prompts = trim_prompts(prompts, tokenizer, args.seq_len - args.completion_length)
    model = AutoModelForCausalLM.from_pretrained(base)
    extra: dict[str, Any] = {}
    if case == "rl_shared":
        reward_funcs: list[Any] = [AdapterReward(os.path.join(workdir, "reward_adapter"))]
    elif case == "rl_separate":
        reward_funcs = [reward_classifier(os.path.join(workdir, "reward_full"))]
        extra["reward_processing_classes"] = [tokenizer]
    else:
        reward_funcs = [_constant_reward]
    rl_args = RLOOConfig(
        output_dir=os.path.join(workdir, "rl_run"),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        num_generations=2,
        max_completion_length=args.completion_length,
        learning_rate=1e-4,
        beta=0.05,
        gradient_checkpointing=args.rl_gradient_checkpointing == "true",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        # fp32 like the reward-model cases and like the CLI on CPU: trl's configs default to bf16, and
        # CPU autocast over fp32 weights keeps a bf16 copy of every frozen weight for backward (+1 GB
        # at bench500m, in every RL case).
        bf16=False,
    )
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=rl_args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=lora_config(model, LoraOptions()),
        **extra,
    )
    return attach(trainer, plugins="lora")


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build the trainer for ``case``, train ``WARMUP_STEPS + steps`` steps, measure."""
    import peft  # noqa: F401  (imported before the floor is read: every case pays for the same modules)
    import torch
    import trl  # noqa: F401
    from transformers import AutoTokenizer

    import perl_plugins.plugins.lora  # noqa: F401
    import perl_plugins.training.pointwise  # noqa: F401
    import perl_plugins.training.sampling  # noqa: F401

    floor = rss_mb()  # interpreter + libraries, no model or data yet
    base = os.path.join(args.workdir, "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.set_num_threads(args.threads)
    steps = WARMUP_STEPS + (args.steps if case.startswith("rm_") else args.rl_steps)
    if case.startswith("rm_"):
        trainer = _reward_trainer(base, tokenizer, args, args.workdir, steps, lora=case == "rm_lora")
    else:
        trainer = _rl_trainer(case, base, tokenizer, args, args.workdir, steps)
    from transformers import TrainerCallback

    timer, tensors, phases, saved = StepTimer(), TensorBytes(), PhaseRss(), SavedActivations()

    class Measure(TrainerCallback):
        def on_optimizer_step(self, *a: Any, **k: Any) -> None:  # after step(), before zero_grad
            tensors.measure(trainer)

    trainer.add_callback(timer)
    trainer.add_callback(Measure())
    saved.trace(trainer)  # inside the phase tracer: its hooks cost no RSS of their own
    phases.trace(trainer)
    setup_peak, before_train = peak_rss_mb(), rss_mb()
    resettable = reset_peak_rss()
    phases.start()
    trainer.train()
    phases.running = False
    train_peak = peak_rss_mb()
    model = trainer.model
    return {
        "case": case,
        "peak_rss_mb": round(max(setup_peak, train_peak) if resettable else train_peak, 1),
        "train_peak_rss_mb": round(train_peak, 1) if resettable else None,
        "import_floor_mb": round(floor, 1),
        "rss_before_train_mb": round(before_train, 1),
        "step_s": round(median(timer.wall[WARMUP_STEPS:]), 3),
        "step_cpu_s": round(median(timer.cpu[WARMUP_STEPS:]), 3),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tensor_mb": tensors.peak,
        "saved_activations_mb": saved.peak,
        "phase_peak_rss_mb": phases.peak,
        "peak_rss_parts_mb": phases.at_peak,
        "phase_growth_mb": phases.growth,
    }


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """The base checkpoint, a reward adapter trained briefly on it, and that adapter merged into a
    separate full reward model (for ``rl_separate``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from perl_plugins.models.embedded import save_default
    from perl_plugins.models.reward import save_reward_adapter, score_texts
    from perl_plugins.training.pointwise import reward_classifier

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    base = str(save_default(work / "base", args.size))
    tokenizer = AutoTokenizer.from_pretrained(base)
    trainer = _reward_trainer(base, tokenizer, args, str(work), steps=2, lora=True)
    trainer.train()
    adapter = save_reward_adapter(trainer.model, work / "reward_adapter", trainer.model.active_adapter)
    merged = PeftModel.from_pretrained(reward_classifier(base), str(adapter)).merge_and_unload()
    merged.save_pretrained(work / "reward_full")
    tokenizer.save_pretrained(work / "reward_full")
    texts = ["User: a latte please\nAgent: Sure.", "User: tea?\nAgent: No."]
    trainer.model.eval()
    merged.eval()
    gap = (score_texts(trainer.model, tokenizer, texts) - score_texts(merged, tokenizer, texts)).abs().max()
    return {
        "base_params": sum(p.numel() for p in merged.parameters()),
        "merged_vs_adapter_max_score_gap": float(gap),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- parent side


def _breakdown(rs: list[dict[str, Any]]) -> dict[str, float]:
    """Median peak RSS split into the idle process (interpreter + libraries), tensors by kind, the
    activations the loss forward saved for backward (LoRA's own / the rest), and the rest (backward
    and generation transients, allocator slack, weight pages never touched count negative)."""
    tensors = {k: median([r["tensor_mb"].get(k, 0.0) for r in rs]) for k in rs[0]["tensor_mb"]}
    saved = {f"activations_{k}": median([r["saved_activations_mb"][k] for r in rs]) for k in ("lora", "base")}
    floor = median([r["import_floor_mb"] for r in rs])
    peak = median([r["peak_rss_mb"] for r in rs])
    other = peak - floor - sum(tensors.values()) - sum(saved.values())
    return {"idle_process": round(floor, 1), **tensors, **saved, "other": round(other, 1)}


def summarize(runs: dict[str, list[dict[str, Any]]], size: str = "bench100m") -> dict[str, Any]:
    for rs in runs.values():
        for run in rs:  # what the case itself adds on top of the interpreter and libraries
            run["net_peak_mb"] = round(run["peak_rss_mb"] - run["import_floor_mb"], 1)
    keys = ("peak_rss_mb", "net_peak_mb", "train_peak_rss_mb", "step_s", "step_cpu_s")
    cases = {
        case: {
            **{k: round(median([r[k] for r in rs]), 3) if rs[0][k] is not None else None for k in keys},
            "import_floor_mb": round(median([r["import_floor_mb"] for r in rs]), 1),
            "rss_before_train_mb": round(median([r["rss_before_train_mb"] for r in rs]), 1),
            "trainable_params": rs[0]["trainable_params"],
            "breakdown_mb": _breakdown(rs),
            **{
                key: {k: median([r[key].get(k, 0.0) for r in rs]) for k in rs[0][key]}
                for key in ("phase_peak_rss_mb", "phase_growth_mb", "peak_rss_parts_mb")
            },
            "runs": [{k: r[k] for k in keys} for r in rs],
        }
        for case, rs in runs.items()
    }

    def r(a: str, b: str, key: str) -> float:
        return ratio(cases[a][key], cases[b][key])

    ratios = {
        "rm_lora_vs_full_peak_ratio": r("rm_lora", "rm_full", "peak_rss_mb"),
        "rm_lora_vs_full_step_ratio": r("rm_lora", "rm_full", "step_s"),
        "rl_shared_vs_separate_peak_ratio": r("rl_shared", "rl_separate", "peak_rss_mb"),
        "rl_shared_vs_policy_only_peak_ratio": r("rl_shared", "rl_policy_only", "peak_rss_mb"),
    }
    above_idle = {  # peaks minus the idle process (interpreter + libraries, no model)
        "rm_lora_vs_full_net_peak_ratio": r("rm_lora", "rm_full", "net_peak_mb"),
        "rl_shared_vs_separate_net_peak_ratio": r("rl_shared", "rl_separate", "net_peak_mb"),
        "rl_shared_vs_policy_only_net_peak_ratio": r("rl_shared", "rl_policy_only", "net_peak_mb"),
    }
    secondary = {
        "rm_lora_vs_full_step_cpu_ratio": r("rm_lora", "rm_full", "step_cpu_s"),
        "rl_shared_vs_separate_step_ratio": r("rl_shared", "rl_separate", "step_s"),
    }
    return {
        **ratios,
        "above_idle": above_idle,
        "goals": (goals := GOALS_BY_SIZE.get(size, GOALS)),
        "goals_met": {k: bool(v <= goals[k]) for k, v in ratios.items()},
        "secondary": secondary,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.case == "setup":
        result = setup(args)
    elif args.case:
        result = run_case(args.case, args)
    else:
        started = time.perf_counter()
        common = [
            f"--steps={args.steps}",
            f"--rl_steps={args.rl_steps}",
            f"--threads={args.threads}",
            f"--batch_size={args.batch_size}",
            f"--seq_len={args.seq_len}",
            f"--completion_length={args.completion_length}",
            f"--size={args.size}",
            f"--rl_gradient_checkpointing={args.rl_gradient_checkpointing}",
        ]
        with tempfile.TemporaryDirectory(prefix="perl_memory_") as workdir:
            me = [os.path.abspath(__file__), f"--workdir={workdir}", *common]
            setup_info = run_json([*me, "--case=setup"])
            print(f"[perl_memory] setup: {json.dumps(setup_info)}", file=sys.stderr, flush=True)
            runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
            for round_index in range(args.rounds):
                for case in CASES if round_index % 2 == 0 else reversed(CASES):
                    runs[case].append(run_json([*me, f"--case={case}"]))
                    progress = f"[perl_memory] round {round_index}: {json.dumps(runs[case][-1])}"
                    print(progress, file=sys.stderr, flush=True)
        result = {
            **summarize(runs, args.size),
            "settings": {
                "size": args.size,
                "params": setup_info["base_params"],
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "completion_length": args.completion_length,
                "warmup_steps": WARMUP_STEPS,
                "timed_rm_steps": args.steps,
                "timed_rl_steps": args.rl_steps,
                "rounds": args.rounds,
                "torch_threads": setup_info["torch_threads"],
            },
            "merged_vs_adapter_max_score_gap": setup_info["merged_vs_adapter_max_score_gap"],
            "wall_s": round(time.perf_counter() - started, 1),
        }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
