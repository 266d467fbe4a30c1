"""The ``grm`` plugin: formulas against direct re-computation, stock equivalence at alpha=0,
LoRA gradients, heads, save/reload, and every bad-input error."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification, TrainingArguments
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

from perl_plugins import PluginIncompatibleError, PluginOptionError, attach
from perl_plugins.embedded import save_default
from perl_plugins.plugins.grm import grm_loss, grm_regularizer, response_logps
from perl_plugins.pointwise import pointwise_trainer, reward_classifier
from perl_plugins.reward_model import MLP_WIDTH, load_reward_adapter, save_reward_adapter, score_texts


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    return str(save_default(tmp_path_factory.mktemp("grm_base"), "tiny"))


PAIRS = Dataset.from_dict(
    {
        "prompt": ["User: a latte please\nAgent:", "User: tea?\nAgent:"] * 4,
        "chosen": [" Sure, one latte.", " Yes, green or black?"] * 4,
        "rejected": [" No.", " API call: {}"] * 4,
    }
)
ROWS = Dataset.from_dict(
    {
        "prompt": ["User: a latte please\nAgent:", "User: tea?\nAgent:"] * 4,
        "completion": [" Sure, one latte.", " No."] * 4,
        "label": [1, 0] * 4,
    }
)


def reward_trainer(base_dir, tokenizer, tmp_path, model=None, **config):
    args = RewardConfig(
        str(tmp_path / "rm"), max_steps=3, per_device_train_batch_size=4, use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no", learning_rate=1e-3, **config,
    )
    model = model if model is not None else reward_classifier(base_dir)
    return RewardTrainer(model=model, args=args, train_dataset=PAIRS, processing_class=tokenizer)


def test_grm_formulas_match_direct_recomputation():
    torch.manual_seed(0)
    rc, rr, lc, lr, fc, fr = (torch.randn(5) * 3 for _ in range(6))
    alpha, beta = 0.3, 0.1
    bt = -torch.log(torch.sigmoid(rc - rr)).mean()
    expected = {
        "sft": -torch.log(torch.sigmoid(beta * lc)).mean(),
        "dpo": -torch.log(torch.sigmoid(beta * ((lc - lr) - (fc - fr)))).mean(),
        "dpo_noref": -torch.log(torch.sigmoid(beta * (lc - lr))).mean(),
    }
    for reg, l_reg in expected.items():
        got = grm_loss(rc, rr, lc, lr, fc, fr, reg=reg, alpha=alpha, beta=beta)
        torch.testing.assert_close(got, (1 - alpha) * bt + alpha * l_reg)
    with pytest.raises(ValueError, match="reference"):
        grm_regularizer(lc, lr, reg="dpo")


def test_response_logps_sum_only_masked_tokens():
    torch.manual_seed(0)
    head = nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 6, 8)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]).bool()
    logp = F.log_softmax(head(hidden), -1)
    expected = torch.stack(
        [sum(logp[b, t - 1, ids[b, t]] for t in range(1, 6) if mask[b, t]) for b in range(2)]
    )
    torch.testing.assert_close(response_logps(head, hidden, ids, mask), expected)


def test_alpha_zero_reproduces_stock_reward_loss(base_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = reward_classifier(base_dir)
    stock = reward_trainer(base_dir, tokenizer, tmp_path, model=copy.deepcopy(model))
    grm = attach(
        reward_trainer(base_dir, tokenizer, tmp_path, model=model), plugins="grm", grm_alpha=0.0, grm_head="linear"
    )
    batch = next(iter(grm.get_train_dataloader()))
    assert "completion_mask" in batch
    stock_batch = {k: v for k, v in batch.items() if k != "completion_mask"}
    stock.model.eval(), grm.model.eval()
    with torch.no_grad():
        expected = stock.compute_loss(stock.model, dict(stock_batch))
        got = grm.compute_loss(grm.model, dict(batch))
    assert torch.equal(expected, got)


def test_grm_with_lora_trains_adapters_and_freezes_lm_head(base_dir, tokenizer, tmp_path):
    trainer = attach(
        reward_trainer(base_dir, tokenizer, tmp_path), plugins="lora,grm", grm_alpha=1.0, grm_reg="sft"
    )
    model = trainer.model
    lm_head = model.get_base_model().lm_head
    assert not lm_head.weight.requires_grad
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, batch)  # alpha = 1: the regularizer alone
    loss.backward()
    # lora_B starts at zero, so only lora_B receives gradient on the first step
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert lm_head.weight.grad is None


def test_grm_logs_both_terms_and_mlp_head_shape(base_dir, tokenizer, tmp_path):
    trainer = attach(reward_trainer(base_dir, tokenizer, tmp_path), plugins="lora,grm", grm_reg="dpo_noref")
    head = trainer.model.get_base_model().score.modules_to_save["default"]
    assert isinstance(head, nn.Sequential)
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]
    assert head[0].p == 0.1
    assert (head[1].in_features, head[1].out_features, head[3].out_features) == (32, MLP_WIDTH, 1)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "reward_loss" in log]
    assert len(logs) == 3 and all("grm_reg_loss" in log for log in logs)


@pytest.mark.parametrize("with_lora", [True, False])
def test_dpo_regularizer_reference_is_the_initial_model(base_dir, tokenizer, tmp_path, with_lora):
    plugins = "lora,grm" if with_lora else "grm"
    trainer = attach(reward_trainer(base_dir, tokenizer, tmp_path), plugins=plugins, grm_reg="dpo", grm_alpha=0.5)
    assert (trainer.perl_grm.reference is None) == with_lora
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    # Before any update the policy equals its reference: the dpo margin is 0, so L_reg = log 2.
    logs = trainer.perl_plugins.recorder._values["eval"]
    assert logs["grm_reg_loss"][-1] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_pointwise_sft_regularizes_thumbs_up_only(base_dir, tokenizer, tmp_path):
    args = TrainingArguments(
        str(tmp_path / "pw"), max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no",
    )
    trainer = attach(pointwise_trainer(reward_classifier(base_dir), tokenizer, args, ROWS), plugins="lora,grm")
    batch = next(iter(trainer.get_train_dataloader()))
    liked = batch["labels"].view(-1) > 0.5
    only_disliked = {k: v[~liked] for k, v in batch.items()}
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, only_disliked)
    assert trainer.perl_plugins.recorder._values["eval"]["grm_reg_loss"][-1] == 0.0
    trainer.train()
    assert any("grm_reg_loss" in log for log in trainer.state.log_history)


def test_grm_reward_adapter_reloads_and_scores_identically(base_dir, tokenizer, tmp_path):
    trainer = attach(reward_trainer(base_dir, tokenizer, tmp_path), plugins="lora,grm")
    trainer.train()
    save_reward_adapter(trainer.model, tmp_path / "adapter", "default")
    texts = [p + c for p, c in zip(PAIRS["prompt"], PAIRS["chosen"])]
    trainer.model.eval()
    before = score_texts(trainer.model, tokenizer, texts)
    reloaded = load_reward_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    assert torch.equal(before, score_texts(reloaded, tokenizer, texts))


def test_bad_options_are_refused(base_dir, tokenizer, tmp_path):
    with pytest.raises(PluginOptionError, match="grm_alpha"):
        attach(reward_trainer(base_dir, tokenizer, tmp_path), plugins="grm", grm_alpha=1.5)
    with pytest.raises(PluginOptionError, match="grm_reg"):
        attach(reward_trainer(base_dir, tokenizer, tmp_path), plugins="grm", grm_reg="kto")


def test_model_without_lm_head_is_refused_before_training(tokenizer, tmp_path, base_dir):
    config = AutoModelForCausalLM.from_pretrained(base_dir).config
    config.num_labels = 1
    in_memory = LlamaForSequenceClassification(config)  # no checkpoint to take an LM head from
    in_memory.config._name_or_path = ""
    trainer = reward_trainer(base_dir, tokenizer, tmp_path, model=in_memory)
    with pytest.raises(PluginIncompatibleError, match="no LM head"):
        attach(trainer, plugins="grm")
    assert not hasattr(trainer, "perl_plugins")


def test_pairwise_regularizers_refuse_pointwise_rows_and_other_trainers(base_dir, tokenizer, tmp_path):
    args = TrainingArguments(str(tmp_path / "pw"), max_steps=1, use_cpu=True, report_to="none")
    pointwise = pointwise_trainer(reward_classifier(base_dir), tokenizer, args, ROWS)
    with pytest.raises(PluginIncompatibleError, match="needs preference pairs"):
        attach(pointwise, plugins="grm", grm_reg="dpo")
    dpo = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_dir),
        args=DPOConfig(str(tmp_path / "dpo"), max_steps=1, use_cpu=True, report_to="none"),
        train_dataset=PAIRS,
        processing_class=tokenizer,
    )
    with pytest.raises(PluginIncompatibleError, match="reward models"):
        attach(dpo, plugins="grm")
