"""A reward is read at the same token in training and in scoring: the same ids (BOS where the
tokenizer adds one, EOS appended to plain text only, chat templates as trl renders them) and the
pad id used in training, even on a base whose own config has no pad id (Llama-3, Mistral)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama_config
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM
from trl import RewardConfig, RewardTrainer

from perl_plugins import attach
from perl_plugins.models.reward import load_reward_adapter, save_reward_adapter, score_texts
from perl_plugins.models.roles import Roles
from perl_plugins.plugins.lora import AdapterReward

PROMPTS = ["User: a latte please\nAgent:", "User: tea?\nAgent:"]
CHOSEN = [" Sure, one latte.", " Yes: green, black or a chai latte with oat milk?"]
REJECTED = [" No.", " API call: {}"]


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The embedded tokenizer made to add a BOS, with a chat template that writes one (as Llama-3's)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_bos_token = True
    tok.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    assert tok("hi")["input_ids"][0] == tok.bos_token_id != tok.pad_token_id
    return tok


@pytest.fixture(scope="module")
def base_without_pad_id(tmp_path_factory, tokenizer):
    """A tiny causal LM whose config has pad_token_id=None (as Llama-3's and Mistral's)."""
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer)
    config.pad_token_id = None
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("no_pad_base")
    model.save_pretrained(path)
    assert AutoModelForCausalLM.from_pretrained(path).config.pad_token_id is None
    return str(path)


def _reward_trainer(base, tok, data, tmp_path):
    args = RewardConfig(str(tmp_path / "rm"), per_device_train_batch_size=2, use_cpu=True, report_to="none")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    torch.manual_seed(1)
    model.score.weight.data.normal_()  # a head that reads something, so positions matter
    return attach(RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok), plugins="lora")


def _training_rewards(trainer) -> torch.Tensor:
    """The rewards the trained classifier gives its training rows (chosen ones), as in its loss."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits.squeeze(-1).chunk(2)[0]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_adapter_scores_a_text_alike_alone_and_in_a_padded_batch_on_a_base_without_pad_id(
    base_without_pad_id, tokenizer, tmp_path, pad_is_eos
):
    tok = copy.deepcopy(tokenizer)
    if pad_is_eos:  # what recipes do for tokenizers without a pad token
        tok.pad_token = tok.eos_token
    data = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = _reward_trainer(base_without_pad_id, tok, data, tmp_path)
    expected = _training_rewards(trainer)
    path = save_reward_adapter(trainer.model, tmp_path / "adapter", trainer.model.active_adapter)

    policy_base = AutoModelForCausalLM.from_pretrained(base_without_pad_id)  # config pad id: None
    reward = load_reward_adapter(policy_base, path).eval()
    texts = [p + c for p, c in zip(PROMPTS, CHOSEN)]
    short_alone = score_texts(reward, tok, texts[:1])
    together = score_texts(reward, tok, texts)  # the short text is right-padded here
    torch.testing.assert_close(together[0], short_alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together, expected, rtol=1e-5, atol=1e-6)


def test_conversations_are_scored_on_the_ids_trl_trained_on(base_without_pad_id, bos_tokenizer, tmp_path):
    """Chat data: trl renders prompt + chosen through the template (no EOS appended);
    AdapterReward must score exactly those ids, not the rendered text plus an extra EOS."""
    prompts = [[{"role": "user", "content": p.removeprefix("User: ").removesuffix("\nAgent:")}] for p in PROMPTS]
    as_messages = [[{"role": "assistant", "content": c.strip()}] for c in CHOSEN]
    rejected = [[{"role": "assistant", "content": r.strip()}] for r in REJECTED]
    data = Dataset.from_dict({"prompt": prompts, "chosen": as_messages, "rejected": rejected})
    trainer = _reward_trainer(base_without_pad_id, bos_tokenizer, data, tmp_path)
    first = trainer.train_dataset[0]["chosen_ids"]
    assert first[0] == bos_tokenizer.bos_token_id and first.count(bos_tokenizer.bos_token_id) == 1
    expected = _training_rewards(trainer)
    path = save_reward_adapter(trainer.model, tmp_path / "adapter", trainer.model.active_adapter)

    from peft import get_peft_model

    from perl_plugins.plugins.lora import LoraOptions, lora_config

    base = AutoModelForCausalLM.from_pretrained(base_without_pad_id)
    policy = get_peft_model(base, lora_config(base, LoraOptions()))
    load_reward_adapter(policy, path, adapter_name="reward")
    reward = AdapterReward(str(path))
    reward.bind(Roles(policy, {"policy": "default", "reward": "reward"}), bos_tokenizer)
    got = reward(prompts=prompts, completions=as_messages)
    torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-5, atol=1e-6)


def test_plain_text_gets_the_tokenizers_bos_as_in_training(base_without_pad_id, bos_tokenizer, tmp_path):
    """RewardTrainer tokenizes with the tokenizer's special tokens (a BOS here); so must scoring,
    for the reward model in training and for its reloaded adapter."""
    data = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = _reward_trainer(base_without_pad_id, bos_tokenizer, data, tmp_path)
    assert trainer.train_dataset[0]["chosen_ids"][0] == bos_tokenizer.bos_token_id
    expected = _training_rewards(trainer)
    texts = [p + c for p, c in zip(PROMPTS, CHOSEN)]
    torch.testing.assert_close(score_texts(trainer.model, bos_tokenizer, texts), expected, rtol=1e-5, atol=1e-6)
