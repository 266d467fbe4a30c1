"""The ``rrhf`` plugin: the loss against a direct re-computation of RRHF's formula, the collator,
and the plugin on a stock ``transformers.Trainer``."""

from __future__ import annotations

import itertools

import datasets
import pytest
import torch
from conftest import tiny_lm, train_quietly

from perl_plugins import attach
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.models.logprobs import response_logps
from perl_plugins.plugins.rrhf import (
    RRHFCollator,
    best_of_groups,
    rrhf_loss,
    rrhf_rank_loss,
    tokenize_groups,
)

GROUPS = {
    "prompt": ["User: a latte please\nAgent:", "User: one espresso\nAgent:", "User: tea?\nAgent:"],
    "responses": [
        [" Sure, one latte.", " No.", " What size would you like?"],
        [" One espresso, coming up.", " Bye."],
        [" We have green tea.", " Coffee only.", " Tea is on the menu.", " Sorry?"],
    ],
    "scores": [[1.0, 0.0, 1.0], [1.0, 0.0], [1.0, 0.0, 0.5, 0.0]],
}


def direct_rrhf(logps_sum, lengths, scores, groups, weight):
    """RRHF written out with python loops: p_i = sum logp / |y_i|; per group, sum over pairs with
    r_i < r_j of max(0, p_i - p_j); groups averaged; L_ft = CE over the best responses' tokens."""
    p = [s / n for s, n in zip(logps_sum.tolist(), lengths.tolist())]
    group_ids = sorted(set(groups.tolist()))
    rank = 0.0
    best_logp = best_len = 0.0
    for g in group_ids:
        members = [i for i, x in enumerate(groups.tolist()) if x == g]
        for i, j in itertools.permutations(members, 2):
            if scores[i] < scores[j]:
                rank += max(0.0, p[i] - p[j])
        top = max(scores[i] for i in members)
        first_best = next(i for i in members if scores[i] == top)
        best_logp += logps_sum[first_best].item()
        best_len += lengths[first_best].item()
    return weight * rank / len(group_ids) + (-best_logp / best_len)


def test_rrhf_loss_matches_direct_formula():
    gen = torch.Generator().manual_seed(0)
    logps_sum = -torch.rand(9, generator=gen) * 30
    lengths = torch.randint(1, 12, (9,), generator=gen)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.2, 0.2, 0.9, 0.1])  # ties inside groups
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    for weight in (1.0, 0.3):
        got = rrhf_loss(logps_sum, lengths, scores, groups, weight=weight)
        assert got.item() == pytest.approx(direct_rrhf(logps_sum, lengths, scores, groups, weight), rel=1e-6)


def test_single_group_is_the_papers_formula():
    logps_sum = torch.tensor([-6.0, -2.0, -9.0])
    lengths = torch.tensor([3, 2, 3])
    scores = torch.tensor([0.2, 0.1, 0.9])  # p = [-2, -1, -3]: every pair is ranked the wrong way
    # pairs (worse, better): (1,0): max(0, -1 + 2) = 1; (1,2): 2; (0,2): 1  -> L_rank = 4; L_ft = 9 / 3
    assert rrhf_rank_loss(logps_sum, lengths, scores).item() == pytest.approx(4.0)
    assert rrhf_loss(logps_sum, lengths, scores, weight=0.5).item() == pytest.approx(0.5 * 4.0 + 3.0)


def test_ties_and_correct_order_give_no_ranking_loss():
    logps_sum = torch.tensor([-1.0, -5.0, -3.0])
    lengths = torch.ones(3)
    assert rrhf_rank_loss(logps_sum, lengths, torch.tensor([0.5, 0.5, 0.5])).item() == 0.0
    assert rrhf_rank_loss(logps_sum, lengths, torch.tensor([1.0, 0.0, 0.5])).item() == 0.0


def test_best_of_groups_takes_first_on_ties():
    best = best_of_groups(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.3]), torch.tensor([0, 0, 0, 1, 1]))
    assert best.tolist() == [True, False, False, False, True]


def test_collator_labels_only_the_best_response(tokenizer):
    groups = tokenize_groups(datasets.Dataset.from_dict(GROUPS), tokenizer)
    batch = RRHFCollator(tokenizer.pad_token_id)([groups[0], groups[1]])
    assert batch["input_ids"].shape[0] == 5
    assert batch["rrhf_groups"].tolist() == [0, 0, 0, 1, 1]
    for row in range(5):
        prompt_len = len(groups[batch["rrhf_groups"][row].item()]["prompt_ids"])
        n = int(batch["attention_mask"][row].sum())
        mask = batch["rrhf_response_mask"][row]
        assert not mask[:prompt_len].any() and mask[prompt_len:n].all() and not mask[n:].any()
        assert batch["input_ids"][row, n - 1].item() == tokenizer.eos_token_id  # responses end with EOS
        labelled = batch["labels"][row] != -100
        assert labelled.any() == (row in (0, 3))  # first best of each group
        if labelled.any():
            assert torch.equal(labelled, mask)


def test_tokenize_groups_cuts_the_prompt_first(tokenizer):
    long = {
        "prompt": ["User: " + "more coffee " * 80 + "\nAgent:"],
        "responses": [[" Sure.", " No."]],
        "scores": [[1, 0]],
    }
    row = tokenize_groups(datasets.Dataset.from_dict(long), tokenizer, max_length=40)[0]
    full = tokenizer(long["prompt"][0], add_special_tokens=False)["input_ids"]
    assert max(len(row["prompt_ids"]) + len(r) for r in row["response_ids"]) == 40
    assert row["prompt_ids"] == full[-len(row["prompt_ids"]) :]  # the latest tokens kept
    assert tokenizer.decode(row["response_ids"][0]) == " Sure." + tokenizer.eos_token


def _rrhf_trainer(tokenizer, tmp_path, **args):
    from transformers import Trainer, TrainingArguments

    data = tokenize_groups(datasets.Dataset.from_dict(GROUPS), tokenizer)
    training = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(
        model=tiny_lm(tokenizer),
        args=TrainingArguments(**{**training, **args}),
        train_dataset=data,
        processing_class=tokenizer,
    )


def test_plugin_loss_is_rrhf_loss_of_the_models_logits(tokenizer, tmp_path):
    trainer = attach(_rrhf_trainer(tokenizer, tmp_path), plugins="lora,rrhf", rrhf_weight=0.7)
    assert isinstance(trainer.data_collator, RRHFCollator)
    model = trainer.model.eval()
    ranks = []
    # With the scores as given and reversed: whatever the random model's order, one of the two
    # orientations mis-ranks some pair, so the ranking term is really exercised.
    for flip in (False, True):
        groups = {**GROUPS, "scores": [[1.0 - x for x in row] if flip else row for row in GROUPS["scores"]]}
        data = tokenize_groups(datasets.Dataset.from_dict(groups), tokenizer)
        batch = trainer.data_collator([data[0], data[2]])
        with torch.no_grad():
            total = trainer.compute_loss(model, dict(batch))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["rrhf_response_mask"]
        logps = response_logps(logits, batch["input_ids"], mask)
        expected = rrhf_loss(logps, mask[:, 1:].sum(-1), batch["rrhf_scores"], batch["rrhf_groups"], weight=0.7)
        assert total.item() == pytest.approx(expected.item(), rel=1e-5)
        ranks.append(rrhf_rank_loss(logps, mask[:, 1:].sum(-1), batch["rrhf_scores"], batch["rrhf_groups"]).item())
    assert max(ranks) > 0


def test_plugin_trains_on_a_stock_trainer(tokenizer, tmp_path):
    trainer = attach(_rrhf_trainer(tokenizer, tmp_path), plugins="lora,rrhf", rrhf_weight=2.0)
    logs = train_quietly(trainer)
    assert len(logs) == 3
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["base_loss"] + 2.0 * entry["rrhf_rank_loss"], rel=1e-4)


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_plugin_refuses_other_trainers(make_trainer, kind):
    with pytest.raises(PluginIncompatibleError, match="rrhf"):
        attach(make_trainer(kind), plugins="rrhf")


def test_plugin_refuses_data_without_groups(make_trainer):
    with pytest.raises(PluginIncompatibleError, match="tokenize_groups"):
        attach(make_trainer("trainer"), plugins="rrhf")


def test_negative_weight_is_an_option_error(tokenizer, tmp_path):
    from perl_plugins.errors import PluginOptionError

    with pytest.raises(PluginOptionError, match="rrhf_weight"):
        attach(_rrhf_trainer(tokenizer, tmp_path), plugins="rrhf", rrhf_weight=-1.0)


def test_ranking_term_fixes_the_order_cross_entropy_leaves(tokenizer, tmp_path):
    """On three training groups, the ranking term drives L_rank to 0 (every differently-scored pair
    ordered right); cross-entropy on the best replies alone (w = 0) does not."""
    from perl_plugins.recipes.rrhf import ranking_accuracy

    data = tokenize_groups(datasets.Dataset.from_dict(GROUPS), tokenizer)
    final = {}
    for weight in (0.0, 1.0):
        trainer = _rrhf_trainer(
            tokenizer,
            tmp_path / str(weight),
            max_steps=30,
            per_device_train_batch_size=3,
            learning_rate=1e-2,
            logging_steps=10,
        )
        attach(trainer, plugins="lora,rrhf", rrhf_weight=weight)
        logs = train_quietly(trainer)
        final[weight] = (logs[-1]["rrhf_rank_loss"], ranking_accuracy(trainer.model, trainer.data_collator, data, 3))
    assert final[1.0] == (0.0, 1.0)
    assert final[0.0][0] > 0 and final[0.0][1] < 1.0
