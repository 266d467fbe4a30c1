"""``perl-plugins {sft,reward,dpo,kto,grpo,rloo}``: trl's trainers from the command line, with
plugins. Flags are trl's own (its config dataclass, ``ScriptArguments``, ``ModelConfig``) plus
``--plugins`` and the enabled plugins' options, from flags or ``--config x.yaml``. Without a model
the embedded default is used; without a dataset, the shipped Taskmaster coffee feedback.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from perl_plugins.errors import UsageError

TRAINERS = {
    "sft": ("SFTTrainer", "SFTConfig"),
    "reward": ("RewardTrainer", "RewardConfig"),
    "dpo": ("DPOTrainer", "DPOConfig"),
    "kto": ("KTOTrainer", "KTOConfig"),
    "grpo": ("GRPOTrainer", "GRPOConfig"),
    "rloo": ("RLOOTrainer", "RLOOConfig"),
}


def _script_arguments() -> type:
    from trl import ScriptArguments

    @dataclass
    class PerlScriptArguments(ScriptArguments):
        taskmaster_file: str | None = field(
            default=None,
            metadata={
                "help": "Taskmaster thumbs up/down file used when no dataset_name is given (default: the "
                "shipped coffee feedback, CC BY 4.0)."
            },
        )
        context_turns: int = field(
            default=4, metadata={"help": "Default data: keep the last N dialog turns of each context (0: all)."}
        )
        feedback: str = field(
            default="pointwise",
            metadata={"help": "reward on default data: 'pointwise' thumbs up/down (BCE) or 'pairs' (Bradley-Terry)."},
        )
        model_size: str = field(
            default="demo", metadata={"help": "Embedded default model size when no model_name_or_path is given."}
        )
        reward_adapter: str | None = field(
            default=None,
            metadata={
                "help": "grpo/rloo: a LoRA reward adapter directory scored on the policy's own base "
                "(needs --plugins lora)."
            },
        )
        reward_model_name_or_path: str | None = field(
            default=None, metadata={"help": "grpo/rloo: a separate sequence-classification reward model."}
        )
        max_train_samples: int | None = field(default=None, metadata={"help": "Use at most N training rows."})
        max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most N evaluation rows."})

    return PerlScriptArguments


def _config_file(argv: Sequence[str]) -> dict[str, Any]:
    """The ``--config`` YAML's keys (empty without one)."""
    argv = list(argv)
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return {}
    path = Path(argv[argv.index("--config") + 1])
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values.")
    return config


def given_settings(argv: Sequence[str]) -> dict[str, Any]:
    """The settings the user gave, by name: flags (value None for a bare ``--flag``) over the
    ``--config`` YAML's keys. Defaults the CLI chooses never override these."""
    given = dict(_config_file(argv))
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            given[name] = value if eq else nxt
    return given


def _plugins_requested(argv: Sequence[str]) -> str | None:
    """``--plugins`` from the flags or the YAML config, read before parsing: local plugin files
    add their own flags to the parser."""
    return given_settings(argv).get("plugins")


def parse(command: str, argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse ``argv`` into (script_args, training_args, model_args, plugin_args). Without an
    accelerator, CPU settings are added unless the user set them (see ``device.cpu_settings``)."""
    import trl

    from perl_plugins.host.arguments import make_plugin_arguments
    from perl_plugins.training.device import cpu_settings

    config_cls = getattr(trl, TRAINERS[command][1])
    plugin_args_cls = make_plugin_arguments(_plugins_requested(argv))
    parser = trl.TrlParser(
        (_script_arguments(), config_cls, trl.ModelConfig, plugin_args_cls), prog=f"perl-plugins {command}"
    )
    extra = [arg for key, value in cpu_settings(given_settings(argv)).items() for arg in (f"--{key}", str(value))]
    try:
        return parser.parse_args_and_config([*argv, *extra])
    except ValueError as exc:  # unknown flags (HfArgumentParser) or values the configs reject (their __post_init__)
        raise UsageError(f"{exc} (see `perl-plugins {command} --help`)") from None


def _source(script_args: Any) -> str:
    return script_args.dataset_name or script_args.taskmaster_file or "the shipped coffee feedback"


def _datasets(command: str, script_args: Any, evaluate: bool = True) -> Any:
    from datasets import load_dataset

    from perl_plugins.data.defaults import default_dataset
    from perl_plugins.data.split_checks import check_splits

    if script_args.dataset_name:
        data = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        train, test = data[script_args.dataset_train_split], data.get(script_args.dataset_test_split)
    else:
        data = default_dataset(command, script_args.taskmaster_file, script_args.context_turns, script_args.feedback)
        train, test = data["train"], data["test"]
    if not evaluate:
        test = None
    if script_args.max_train_samples:
        train = train.select(range(min(len(train), script_args.max_train_samples)))
    if test is not None and script_args.max_eval_samples:
        test = test.select(range(min(len(test), script_args.max_eval_samples)))
    check_splits(
        train,
        test,
        _source(script_args),
        hint="use more rows (--max_train_samples / --max_eval_samples), a larger file, or --eval_strategy no to train "
        "without a held-out split",
    )
    return train, test


def _reward_funcs(script_args: Any) -> list[Any]:
    from perl_plugins.models.adapters import AdapterReward

    funcs: list[Any] = []
    if script_args.reward_adapter:
        funcs.append(AdapterReward(script_args.reward_adapter))
    if script_args.reward_model_name_or_path:
        funcs.append(script_args.reward_model_name_or_path)
    return funcs


def check_request(command: str, script_args: Any, training_args: Any, plugins: Sequence[Any]) -> None:
    """Refuse, before any model or data is loaded, what would otherwise fail deep inside training."""
    from perl_plugins.host.registry import short_name

    if command in ("grpo", "rloo") and not (script_args.reward_adapter or script_args.reward_model_name_or_path):
        raise UsageError("grpo/rloo need --reward_adapter DIR (with --plugins lora) or --reward_model_name_or_path.")
    if script_args.reward_adapter and "lora" not in [short_name(p) for p in plugins if isinstance(p, str)]:
        raise UsageError(
            f"--reward_adapter {script_args.reward_adapter} is scored on the policy's own base by the "
            "lora plugin: add lora to --plugins (e.g. --plugins lora)."
        )
    resume = training_args.resume_from_checkpoint
    if resume and str(resume).lower() != "true" and not Path(resume).is_dir():
        raise UsageError(
            f"--resume_from_checkpoint {resume} does not exist (give a checkpoint-<step> directory, "
            "or true for the latest one in --output_dir)."
        )


def build_trainer(
    command: str, script_args: Any, training_args: Any, model_args: Any, plugin_args: Any, *, evaluate: bool = True
) -> Any:
    """The stock trl (or transformers, for pointwise rewards) trainer with plugins attached. With
    ``evaluate`` the held-out split (if any) is kept as the eval set, also when ``eval_strategy`` is
    "no": the CLI then evaluates once at the end."""
    import trl
    from transformers import AutoModelForCausalLM

    from perl_plugins import attach
    from perl_plugins.data.split_checks import check_splits
    from perl_plugins.models.adapters import LoraOptions, lora_config
    from perl_plugins.training.pointwise import pointwise_trainer, reward_classifier
    from perl_plugins.training.recipe_kit import load_base

    plugins, options = plugin_args.attach_kwargs(model_args)
    check_request(command, script_args, training_args, plugins)
    model_path, tokenizer = load_base(model_args.model_name_or_path, script_args.model_size)
    train, test = _datasets(command, script_args, evaluate)
    uses_lora = "lora" in plugins

    if command == "reward":
        model = reward_classifier(model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path)
    # With lora on a policy trainer, build it on a peft model straight away: trl then never loads a
    # reference copy. Reward models are wrapped by the plugin, after grm has given them their head.
    peft_config = trl.get_peft_config(model_args)
    if peft_config is None and uses_lora and command != "reward":
        lora_options = {k: v for k, v in options.items() if k in {f.name for f in dataclasses.fields(LoraOptions)}}
        peft_config = lora_config(model, LoraOptions(**lora_options))

    if command == "reward" and "label" in train.column_names:
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        max_length = getattr(training_args, "max_length", None)
        trainer = pointwise_trainer(model, tokenizer, training_args, train, test, max_length=max_length)
    else:
        trainer_cls = getattr(trl, TRAINERS[command][0])
        kwargs: dict[str, Any] = {"peft_config": peft_config}
        if command in ("grpo", "rloo"):
            kwargs["reward_funcs"] = _reward_funcs(script_args)
        trainer = trainer_cls(
            model=model,
            args=training_args,
            train_dataset=train,
            eval_dataset=test,
            processing_class=tokenizer,
            **kwargs,
        )
        if command == "reward":  # trl's RewardTrainer drops pairs longer than max_length
            check_splits(
                trainer.train_dataset,
                trainer.eval_dataset,
                f"{_source(script_args)} (pairs within --max_length {training_args.max_length})",
                hint="raise --max_length, lower --context_turns, or use more rows",
            )
    return attach(trainer, plugins=plugins, **options)


def save_outputs(command: str, trainer: Any) -> dict[str, Any]:
    """Save the trained model (a reward adapter keeps its head spec) and return final metrics."""
    from perl_plugins.host.attach import trainer_family
    from perl_plugins.models.reward import save_adapter, save_reward_adapter
    from perl_plugins.training.reward_metrics import evaluate_trainer_pairs

    output_dir = trainer.args.output_dir
    writer = trainer.args.should_save  # with several processes, the main one writes
    model = trainer.model
    if hasattr(model, "peft_config"):  # the trained adapter only: a frozen reward adapter is an input
        save = save_reward_adapter if command == "reward" else save_adapter
        save(model, output_dir, model.active_adapter, write=writer)
        if writer and trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)  # handles DDP and DeepSpeed itself
    metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    if command == "reward" and trainer.eval_dataset is not None and trainer_family(trainer) == "RewardTrainer":
        metrics.update(evaluate_trainer_pairs(trainer))  # the stock RewardTrainer logs pair accuracy; add AUC
    if writer:
        Path(output_dir, "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run(command: str, argv: Sequence[str]) -> dict[str, Any]:
    """Parse, build, train, save; returns the final evaluation metrics (empty without eval data)."""
    from perl_plugins.models.card import training_data, write_model_card
    from perl_plugins.training.progress import quiet_progress

    script_args, training_args, model_args, plugin_args = parse(command, argv)
    # Evaluate at the end whenever there is a held-out split, unless the user said --eval_strategy no.
    evaluate = str(given_settings(argv).get("eval_strategy", "")).lower() != "no"
    trainer = quiet_progress(
        build_trainer(command, script_args, training_args, model_args, plugin_args, evaluate=evaluate)
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    metrics = save_outputs(command, trainer)
    data = training_data(script_args.taskmaster_file, script_args.dataset_name)
    write_model_card(
        training_args.output_dir, trainer=trainer, metrics=metrics, data=data, write=training_args.should_save
    )
    if trainer.is_world_process_zero():
        print(json.dumps({"command": command, "output_dir": training_args.output_dir, "metrics": metrics}))
    return metrics
