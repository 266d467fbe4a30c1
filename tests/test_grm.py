"""The ``grm`` plugin: formulas against direct re-computation, stock equivalence at alpha=0,
LoRA gradients, heads, save/reload, and every bad-input error."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification, TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

from perl_plugins import PluginIncompatibleError, PluginOptionError, attach, state
from perl_plugins.models.embedded import save_default
from perl_plugins.models.logprobs import response_logps
from perl_plugins.models.reward import MLP_WIDTH, load_reward_adapter, save_reward_adapter, score_texts
from perl_plugins.plugins.grm import grm_loss, grm_regularizer
from perl_plugins.training.pointwise import pointwise_trainer, reward_classifier


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
        str(tmp_path / "rm"),
        max_steps=3,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        **config,
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
    expected = torch.stack([sum(logp[b, t - 1, ids[b, t]] for t in range(1, 6) if mask[b, t]) for b in range(2)])
    torch.testing.assert_close(response_logps(hidden, ids, mask, head), expected)


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
    trainer = attach(reward_trainer(base_dir, tokenizer, tmp_path), plugins="lora,grm", grm_alpha=1.0, grm_reg="sft")
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
    trainer = attach(
        reward_trainer(base_dir, tokenizer, tmp_path, disable_dropout=False), plugins="lora,grm", grm_reg="dpo_noref"
    )
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
    assert (state(trainer)["grm"].reference is None) == with_lora
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    # Before any update the policy equals its reference: the dpo margin is 0, so L_reg = log 2.
    logs = trainer.perl_plugins.recorder._values["eval"]
    assert logs["grm_reg_loss"][-1] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_pointwise_sft_regularizes_thumbs_up_only(base_dir, tokenizer, tmp_path):
    args = TrainingArguments(
        str(tmp_path / "pw"),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
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


# Chosen and rejected share the start of the response (as the coffee pairs' ' API call: {...' do).
SHARED_START = Dataset.from_dict(
    {
        "prompt": ["User: the menu?\nAgent:", "User: a mocha\nAgent:"],
        "chosen": [' API call: {"get_menu_items": "all"}', ' API call: {"order": "mocha"}'],
        "rejected": [' API call: {"get_menu": 1}', ' API call: {"order": "latte"}'],
    }
)


def _direct_response_logps(base_dir, ids: list[int], start: int) -> torch.Tensor:
    """sum_{t >= start} log p(ids[t] | ids[:t]) from a plain causal-LM forward of the same base."""
    lm = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        logp = lm(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("reg", ["sft", "dpo_noref"])
def test_pair_regularizer_masks_the_prompt_not_the_shared_start_of_the_responses(base_dir, tokenizer, tmp_path, reg):
    args = RewardConfig(str(tmp_path / "rm"), per_device_train_batch_size=2, use_cpu=True, report_to="none")
    trainer = RewardTrainer(
        model=reward_classifier(base_dir), args=args, train_dataset=SHARED_START, processing_class=tokenizer
    )
    attach(trainer, plugins="grm", grm_reg=reg, grm_alpha=1.0, grm_head="linear", grm_beta=0.1)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    got = trainer.perl_plugins.recorder._values["eval"]["grm_reg_loss"][-1]

    expected, shared_prefix_version = [], []
    for row, prompt in zip(trainer.train_dataset, SHARED_START["prompt"]):
        chosen, rejected = row["chosen_ids"], row["rejected_ids"]
        prompt_len = len(tokenizer(prompt)["input_ids"])  # trl's tokenization of the prompt column
        shared = _common_prefix(chosen, rejected)
        assert chosen[:prompt_len] == tokenizer(prompt)["input_ids"] and shared > prompt_len + 3
        if reg == "sft":
            expected.append(-F.logsigmoid(0.1 * _direct_response_logps(base_dir, chosen, prompt_len)))
        else:
            for start, out in ((prompt_len, expected), (shared, shared_prefix_version)):
                margin = _direct_response_logps(base_dir, chosen, start) - _direct_response_logps(
                    base_dir, rejected, start
                )
                out.append(-F.logsigmoid(0.1 * margin))
    assert got == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)
    if reg == "dpo_noref":  # the shared start cancels in the margin: unaffected by where the prompt ends
        assert got == pytest.approx(torch.stack(shared_prefix_version).mean().item(), rel=1e-4)


class _GradCapture(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("plugins", ["grm", "lora,grm"])
def test_pointwise_grm_gradients_do_not_depend_on_gradient_accumulation(base_dir, tokenizer, tmp_path, plugins):
    """One micro-batch of 4 rows and two of 2 give the same first gradient: the stock BCE ignores
    num_items_in_batch, so the added regularizer must be scaled exactly as that loss is."""
    rows = Dataset.from_dict(
        {
            "prompt": ["User: a latte please\nAgent:", "User: tea?\nAgent:", "User: mocha\nAgent:", "User: hi\nAgent:"],
            "completion": [" Sure, one latte.", " No.", " One mocha.", " What?"],
            "label": [1, 1, 0, 1],
        }
    )

    def first_gradients(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        args = TrainingArguments(
            str(tmp_path / f"ga{accumulation}"),
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=0.0,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            seed=0,
        )
        torch.manual_seed(0)
        trainer = pointwise_trainer(reward_classifier(base_dir), tokenizer, args, rows)
        lora = {"lora_dropout": 0.0} if "lora" in plugins else {}
        attach(trainer, plugins=plugins, grm_alpha=0.5, grm_head="linear", **lora)
        capture = _GradCapture(trainer.model)
        trainer.add_callback(capture)
        trainer.train()
        return capture.grads

    whole, accumulated = first_gradients(4, 1), first_gradients(2, 2)
    assert whole.keys() == accumulated.keys() and whole
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("disable", [True, False])
def test_modules_plugins_add_follow_the_trainers_disable_dropout(base_dir, tokenizer, tmp_path, disable):
    trainer = attach(reward_trainer(base_dir, tokenizer, tmp_path, disable_dropout=disable), plugins="lora,grm")
    rates = {m.p for m in trainer.model.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0} if disable else {0.05, 0.1} <= rates  # lora_dropout, the MLP head's dropout
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        first, second = (
            trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for _ in range(2)
        )
    assert torch.equal(first, second) == disable  # chosen and rejected rows see no independent masks
