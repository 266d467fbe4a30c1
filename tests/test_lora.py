"""The ``lora`` plugin: roles on one base, reward heads saved with adapters, pointwise and pairwise
reward models, shared-base RLOO/GRPO, and the bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from perl_plugins import PluginIncompatibleError, PluginOptionError, attach
from perl_plugins.cli import main as cli_main
from perl_plugins.models.embedded import save_default
from perl_plugins.models.reward import (
    RewardAdapterError,
    load_reward_adapter,
    reward_encoding,
    save_reward_adapter,
    score,
    score_texts,
)
from perl_plugins.models.roles import UnknownRoleError
from perl_plugins.plugins.lora import AdapterReward, roles
from perl_plugins.training.pointwise import pointwise_trainer, reward_classifier
from perl_plugins.training.reward_metrics import roc_auc

ROWS = Dataset.from_dict(
    {
        "prompt": ["User: a latte please\nAgent:", "User: tea?\nAgent:"] * 4,
        "completion": [" Sure, one latte.", " No."] * 4,
        "label": [1, 0] * 4,
    }
)
PROMPTS = Dataset.from_dict({"prompt": ["User: a latte please\nAgent:", "User: tea?\nAgent:"] * 4})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    return str(save_default(tmp_path_factory.mktemp("lora_base"), "tiny"))


@pytest.fixture(scope="module")
def reward_adapter(base_dir, tokenizer, tmp_path_factory):
    """A trained LoRA reward adapter (pointwise, linear head) and the scores it gave before saving."""
    out = tmp_path_factory.mktemp("reward_adapter")
    args = TrainingArguments(
        str(out / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        learning_rate=5e-3,
    )
    trainer = attach(pointwise_trainer(reward_classifier(base_dir), tokenizer, args, ROWS), plugins="lora")
    trainer.train()
    path = save_reward_adapter(trainer.model, out / "adapter", "default")
    trainer.model.eval()
    texts = [p + c for p, c in zip(ROWS["prompt"], ROWS["completion"])]
    return str(path), texts, score_texts(trainer.model, tokenizer, texts), trainer


def rl_trainer(kind, base_dir, tokenizer, tmp_path, reward_path, **config):
    cls, config_cls = (RLOOTrainer, RLOOConfig) if kind == "rloo" else (GRPOTrainer, GRPOConfig)
    args = config_cls(
        str(tmp_path / kind),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-2,
        beta=0.1,
        **config,
    )
    return cls(
        model=AutoModelForCausalLM.from_pretrained(base_dir),
        reward_funcs=[AdapterReward(reward_path)],
        args=args,
        train_dataset=PROMPTS,
        processing_class=tokenizer,
    )


def test_reward_head_is_saved_with_the_adapter_and_scores_identically(reward_adapter, base_dir, tokenizer):
    path, texts, before, trainer = reward_adapter
    spec = json.loads(open(f"{path}/perl_reward_head.json").read())
    assert spec["head"] == "linear" and spec["base"]["fingerprint"]
    # our pooling equals the classification model's own forward
    batch = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        assert torch.equal(trainer.model(**batch).logits[:, 0], score(trainer.model, **batch))
    # reloaded onto a fresh causal LM (the policy's kind of model): the same scores, bit for bit
    reloaded = load_reward_adapter(AutoModelForCausalLM.from_pretrained(base_dir), path).eval()
    assert torch.equal(before, score_texts(reloaded, tokenizer, texts))


def test_pointwise_reward_is_read_at_the_completions_last_token(reward_adapter, base_dir, tokenizer):
    path, texts, before, trainer = reward_adapter
    assert json.loads(open(f"{path}/perl_reward_head.json").read())["encoding"]["append_eos"] is False
    # the training ids are the text's own tokens, no EOS appended (pad and EOS differ in this tokenizer)
    ids = trainer.train_dataset[0]["input_ids"]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and ids[-1] != tokenizer.eos_token_id
    assert ids == tokenizer(texts[0])["input_ids"][-len(ids) :]
    # a score read there, by hand: the head on the last hidden state of the unpadded text
    model = trainer.model
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        by_hand = model.get_base_model().score(hidden[0, -1])
    assert torch.allclose(before[0], by_hand.squeeze(), atol=1e-5)


def test_pointwise_reward_with_append_eos_records_it(base_dir, tokenizer, tmp_path):
    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, use_cpu=True, report_to="none", save_strategy="no")
    trainer = pointwise_trainer(reward_classifier(base_dir), tokenizer, args, ROWS, append_eos=True)
    assert trainer.train_dataset[0]["input_ids"][-1] == tokenizer.eos_token_id
    assert reward_encoding(trainer.model).append_eos is True


@pytest.mark.parametrize("kind", ["rloo", "grpo"])
def test_rl_shares_one_base_between_policy_reference_and_reward(kind, reward_adapter, base_dir, tokenizer, tmp_path):
    path = reward_adapter[0]
    trainer = attach(rl_trainer(kind, base_dir, tokenizer, tmp_path, path), plugins="lora")
    assert trainer.ref_model is None  # reference = adapters off
    role_set = roles(trainer)
    assert set(role_set.names) == {"policy", "reference", "reward"}
    assert trainer.reward_funcs[0].roles is role_set and role_set.model is trainer.model

    def base_storage():
        return sorted(
            p.data_ptr() for n, p in trainer.model.named_parameters() if "lora_" not in n and "score" not in n
        )

    pointers = {}
    for role in role_set.names:
        with role_set.use(role):
            pointers[role] = base_storage()
    assert pointers["policy"] == pointers["reference"] == pointers["reward"]

    reward_before = {n: p.clone() for n, p in trainer.model.named_parameters() if ".reward." in n}
    policy_before = {n: p.clone() for n, p in trainer.model.named_parameters() if ".default." in n}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "reward" in log]
    assert logs and all("kl" in log for log in logs)  # the KL penalty to adapters-off is computed
    assert any("rewards/reward_adapter/mean" in log for log in logs)
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in reward_before.items())  # reward role stays frozen
    assert any(not torch.equal(params[n], p) for n, p in policy_before.items())  # the policy learned
    assert trainer.model.active_adapter == "default"


def test_adapter_reward_matches_direct_scoring(reward_adapter, base_dir, tokenizer, tmp_path):
    path, texts, before, _ = reward_adapter
    trainer = attach(rl_trainer("rloo", base_dir, tokenizer, tmp_path, path), plugins="lora")
    prompts, completions = list(ROWS["prompt"]), list(ROWS["completion"])
    rewards = trainer.reward_funcs[0](prompts=prompts, completions=completions)
    torch.testing.assert_close(torch.tensor(rewards), before, rtol=0, atol=1e-6)


def test_readme_reward_role_scores_with_score_texts(reward_adapter, base_dir, tokenizer, tmp_path):
    """The README's snippet: inside ``roles(trainer).use("reward")`` the model is still a causal LM
    (calling it gives LM logits); ``score_texts`` gives the reward adapter's rewards."""
    path, texts, before, _ = reward_adapter
    trainer = attach(rl_trainer("rloo", base_dir, tokenizer, tmp_path, path), plugins="lora")
    with roles(trainer).use("reward") as model, torch.no_grad():
        rewards = score_texts(model, tokenizer, texts)
        logits = model(**tokenizer(texts[:1], return_tensors="pt")).logits
    torch.testing.assert_close(rewards, before, rtol=0, atol=1e-6)
    assert logits.shape[-1] == len(tokenizer)  # LM logits, not one reward


def test_user_peft_config_wins(base_dir, tokenizer, tmp_path, reward_adapter):
    args = RLOOConfig(
        str(tmp_path / "r"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        use_cpu=True,
        report_to="none",
    )
    trainer = RLOOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_dir),
        reward_funcs=[AdapterReward(reward_adapter[0])],
        args=args,
        train_dataset=PROMPTS,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    attach(trainer, plugins="lora", lora_r=64)
    assert trainer.model.peft_config["default"].r == 2


def test_lora_dropout_is_folded_into_lora_a_unless_turned_off(reward_adapter, base_dir, tokenizer, tmp_path):
    from perl_plugins.models.lora_dropout import DroppedLoraA

    def lora_a_types(model):
        return {type(m) for n, m in model.named_modules() if n.endswith("lora_A.default")}

    assert lora_a_types(reward_adapter[3].model) == {DroppedLoraA}  # the plugin's default
    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, use_cpu=True, report_to="none")
    trainer = pointwise_trainer(reward_classifier(base_dir), tokenizer, args, ROWS)
    attach(trainer, plugins="lora", lora_dropout_recompute=False)
    assert lora_a_types(trainer.model) == {torch.nn.Linear}


def test_reward_adapter_from_another_base_is_refused(reward_adapter, tokenizer, tmp_path):
    other = str(save_default(tmp_path / "other", "tiny", seed=1))  # same shapes, other weights
    trainer = rl_trainer("rloo", other, tokenizer, tmp_path, reward_adapter[0])
    with pytest.raises(RewardAdapterError, match="was trained on base"):
        attach(trainer, plugins="lora")
    assert not hasattr(trainer, "perl_plugins") and not hasattr(trainer.model, "peft_config")


def test_reward_adapter_with_other_shapes_is_refused(reward_adapter, tokenizer, tmp_path):
    path = reward_adapter[0]
    spec_file = f"{path}/perl_reward_head.json"
    bigger = str(save_default(tmp_path / "bigger", "demo"))
    model = AutoModelForCausalLM.from_pretrained(bigger)
    saved = open(spec_file).read()
    try:
        import os

        os.remove(spec_file)  # without a recorded fingerprint, shapes still catch it
        with pytest.raises(RewardAdapterError, match="does not fit this base"):
            load_reward_adapter(model, path)
    finally:
        open(spec_file, "w").write(saved)


def test_unknown_role_lists_roles(reward_adapter, base_dir, tokenizer, tmp_path):
    trainer = attach(rl_trainer("rloo", base_dir, tokenizer, tmp_path, reward_adapter[0]), plugins="lora")
    with pytest.raises(UnknownRoleError, match=r"roles are \['policy', 'reference', 'reward'\]"):
        with roles(trainer).use("critic"):
            pass


def test_bad_lora_options_and_missing_reward_role(reward_adapter, base_dir, tokenizer, tmp_path):
    with pytest.raises(PluginOptionError, match="lora_r"):
        attach(rl_trainer("rloo", base_dir, tokenizer, tmp_path, reward_adapter[0]), plugins="lora", lora_r=0)
    trainer = rl_trainer("rloo", base_dir, tokenizer, tmp_path, reward_adapter[0])
    with pytest.raises(PluginIncompatibleError, match="'reward' role"):
        attach(trainer, plugins="lora", lora_roles="policy,reference")


def test_roc_auc_matches_pairwise_definition():
    scores = [0.1, 0.4, 0.35, 0.8, 0.8, 0.2]
    labels = [0, 0, 1, 1, 0, 1]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    expected = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(expected)


@pytest.mark.parametrize("feedback", ["pointwise", "pairs"])
def test_cli_reward_trains_and_reports_accuracy_and_auc(feedback, tmp_path, capsys):
    out = tmp_path / feedback
    code = cli_main(
        [
            "reward",
            "--plugins",
            "lora",
            "--feedback",
            feedback,
            "--model_size",
            "tiny",
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--max_train_samples",
            "16",
            "--max_eval_samples",
            "16",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--max_length",
            "1024",
            "--use_cpu",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert "eval_accuracy" in metrics and 0.0 <= metrics["eval_auc"] <= 1.0
    assert (out / "perl_reward_head.json").is_file()
