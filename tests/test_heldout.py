"""Held-out before/after figures the DPO, RRHF and RAFT recipes report: standard errors, paired
gains and pairwise accuracies against direct re-computations on small inputs; DPO's per-pair
implicit rewards against trl's own evaluation and a hand computation of the log-probs; RRHF's
per-group ranking against a python loop; the validation split carved out of train."""

from __future__ import annotations

import math
import warnings

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_lm

from perl_plugins.data import taskmaster
from perl_plugins.data.defaults import default_dataset
from perl_plugins.training.heldout import before_after, mean_se, pair_wins


def test_mean_se_of_equal_weights_is_the_textbook_formula():
    x = np.array([0.3, 1.2, -0.5, 2.0, 0.9])
    mean, se = mean_se(x)
    assert mean == pytest.approx(sum(x) / 5)
    assert se == pytest.approx(math.sqrt(sum((v - x.mean()) ** 2 for v in x) / 4) / math.sqrt(5))


def test_weighted_mean_se_is_the_pooled_share_and_matches_a_cluster_bootstrap():
    """Groups of 1..6 pairs, each won or lost: the weighted mean of per-group accuracies is the
    pooled share of won pairs, and its standard error is close to the spread of that share when
    whole groups are resampled."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 7, size=40)
    outcomes = [rng.random(n) < rng.uniform(0.2, 0.9) for n in sizes]
    wins = np.array([o.sum() for o in outcomes], dtype=float)
    mean, se = mean_se(wins / sizes, weights=sizes)
    assert mean == pytest.approx(wins.sum() / sizes.sum())
    draws = rng.integers(0, len(sizes), size=(20000, len(sizes)))
    boot = wins[draws].sum(1) / sizes[draws].sum(1)
    assert se == pytest.approx(boot.std(), rel=0.05)


def test_before_after_gain_has_the_paired_standard_error():
    rng = np.random.default_rng(1)
    before = rng.normal(size=12)
    after = before + rng.normal(0.4, 0.2, size=12)
    report = before_after("x", before, after, before_std=2.0)
    diff = after - before
    assert report["x_before"] == pytest.approx(before.mean())
    assert report["x_after_se"] == pytest.approx(after.std(ddof=1) / math.sqrt(12))
    assert report["x_gain"] == pytest.approx(after.mean() - before.mean())
    assert report["x_gain_se"] == pytest.approx(math.sqrt(((diff - diff.mean()) ** 2).sum() / 11 / 12))
    assert report["x_gain_se"] < report["x_after_se"]  # the items' own spread cancels out of the gain
    assert report["x_gain_in_std"] == pytest.approx(report["x_gain"] / 2.0)
    assert "y_gain_in_std" not in before_after("y", before, after)


def test_before_after_refuses_different_items():
    with pytest.raises(ValueError, match="x: before and after score different items"):
        before_after("x", [1.0, 2.0], [1.0])


def test_dpo_implicit_reward_accuracy_on_hand_built_logprobs():
    """margin = beta * ((logp_c - ref_c) - (logp_r - ref_r)); a pair is won when it is > 0,
    half-won on a tie (the policy before training: it is the reference, every margin 0)."""
    beta = 0.1
    # (logp_c, logp_r, ref_c, ref_r) per pair
    pairs = [(-10.0, -12.0, -11.0, -11.0), (-8.0, -7.0, -8.0, -8.0), (-5.0, -6.0, -5.0, -6.0), (-3.0, -9.0, -4.0, -4.0)]
    policy = np.array([c - r for c, r, _, _ in pairs])
    reference = np.array([rc - rr for _, _, rc, rr in pairs])
    margins = beta * (policy - reference)
    assert margins == pytest.approx([0.2, -0.1, 0.0, 0.6])
    assert list(pair_wins(margins)) == [1.0, 0.0, 0.5, 1.0]
    assert mean_se(pair_wins(margins))[0] == pytest.approx(2.5 / 4)
    assert mean_se(pair_wins(beta * (reference - reference)))[0] == 0.5


PAIRS = {
    "prompt": ["User: a latte please\nAgent:", "User: one espresso\nAgent:", "User: tea?\nAgent:", "User: hi\nAgent:"],
    "chosen": [" Sure, one latte.", " One espresso, coming up.", " We have green tea.", " Hello, what can I get?"],
    "rejected": [" No.", " Bye.", " Coffee only.", " Sorry?"],
}


def test_dpo_logratios_match_trl_and_a_direct_computation(tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from perl_plugins import attach
    from perl_plugins.models.adapters import LoraOptions, lora_config
    from perl_plugins.training.recipe_kit import stage_args
    from perl_plugins.training.reward_metrics import dpo_logratios

    model = tiny_lm(tokenizer)
    data = datasets.Dataset.from_dict(PAIRS)
    args = stage_args(DPOConfig, str(tmp_path), 0, per_device_eval_batch_size=4, beta=0.5, max_length=64)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(model, LoraOptions(lora_r=4)),
    )
    attach(trainer, plugins="lora")
    policy, reference = dpo_logratios(trainer)
    assert np.array_equal(policy, reference)  # LoRA starts at zero: the policy is the reference
    torch.manual_seed(1)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    policy, reference = dpo_logratios(trainer)
    assert not np.allclose(policy, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_metrics = trainer.evaluate()
    margins = 0.5 * (policy - reference)
    assert trl_metrics["eval_rewards/margins"] == pytest.approx(margins.mean(), abs=1e-4)
    assert trl_metrics["eval_rewards/accuracies"] == pytest.approx((margins > 0).mean())

    def logp(text_prompt, reply):  # summed log-prob of the reply's tokens (and EOS) after the prompt
        prompt_ids = tokenizer(text_prompt)["input_ids"]
        ids = tokenizer(text_prompt + reply + tokenizer.eos_token)["input_ids"]
        with torch.no_grad():
            logits = trainer.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return sum(logits[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))

    expected = [logp(p, c) - logp(p, r) for p, c, r in zip(PAIRS["prompt"], PAIRS["chosen"], PAIRS["rejected"])]
    assert policy == pytest.approx(expected, abs=1e-3)


def test_group_ranking_matches_a_python_loop(tokenizer):
    from perl_plugins.recipes.rrhf import group_ranking, ranking_accuracy

    from perl_plugins.plugins.rrhf import RRHFCollator, tokenize_groups

    groups = {
        "prompt": ["User: a latte please\nAgent:", "User: one espresso\nAgent:", "User: tea?\nAgent:"],
        "responses": [
            [" Sure, one latte.", " No.", " What size would you like?"],
            [" One espresso, coming up.", " Bye."],
            [" We have green tea.", " Coffee only.", " Tea is on the menu.", " Sorry?"],
        ],
        "scores": [[1.0, 0.0, 1.0], [1.0, 1.0], [1.0, 0.0, 0.5, 0.0]],
    }
    data = tokenize_groups(datasets.Dataset.from_dict(groups), tokenizer)
    model = tiny_lm(tokenizer).eval()
    wins, pairs = group_ranking(model, RRHFCollator(tokenizer.pad_token_id), data, batch_size=2)

    expected_wins, expected_pairs = [], []
    for row in data:
        p = []
        for response in row["response_ids"]:
            ids = list(row["prompt_ids"]) + list(response)
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            start = len(row["prompt_ids"])
            p.append(sum(lp[t - 1, ids[t]].item() for t in range(start, len(ids))) / len(response))
        won = n = 0.0
        for i, si in enumerate(row["scores"]):
            for j, sj in enumerate(row["scores"]):
                if si > sj:
                    n += 1
                    won += 1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0
        expected_wins.append(won)
        expected_pairs.append(n)
    assert list(pairs) == expected_pairs == [2, 0, 5]
    assert wins == pytest.approx(expected_wins)
    assert ranking_accuracy(model, RRHFCollator(tokenizer.pad_token_id), data, 2) == pytest.approx(sum(wins) / 7)


def test_validation_split_is_carved_out_of_train_without_leaks():
    splits = taskmaster.load_splits()
    validation = default_dataset("reward", heldout="validation", context_turns=None)
    full = default_dataset("reward", context_turns=None)
    assert len(validation["train"]) + len(validation["test"]) == len(full["train"])
    held_out = set(full["test"]["prompt"])
    assert not held_out & set(validation["test"]["prompt"]) and not held_out & set(validation["train"]["prompt"])
    rows = taskmaster.split_rows(splits["train"], 0.2, seed=1)
    assert set(validation["test"]["prompt"]) == {r.prompt for r in rows["test"]}
    assert not any(taskmaster.count_leaks(rows["train"], rows["test"]).values())
    again = default_dataset("reward", heldout="validation", context_turns=None)
    assert again["test"]["prompt"] == validation["test"]["prompt"]
    with pytest.raises(ValueError, match="heldout must be one of"):
        default_dataset("reward", heldout="dev")


def test_sampled_rewards_repeat_their_draws_and_count_prompts_for_the_standard_error(tokenizer):
    from perl_plugins.training.sampling import sampled_rewards

    model = tiny_lm(tokenizer)
    prompts = PAIRS["prompt"]

    def reward(prompts, completions):  # stands in for a reward adapter: any score of the text
        return [float(len(c)) for c in completions]

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = sampled_rewards(model, tokenizer, reward, prompts, 3, max_new_tokens=5, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    again = sampled_rewards(model, tokenizer, reward, prompts, 3, max_new_tokens=5, seed=0)
    assert [c for _, c, _ in again["samples"]] == [c for _, c, _ in first["samples"]]
    r = np.array([r for _, _, r in first["samples"]]).reshape(4, 3)
    assert first["mean"] == pytest.approx(r.mean()) and first["std"] == pytest.approx(r.std(ddof=1))
    assert first["per_prompt"] == pytest.approx(r.mean(1))
    assert first["se"] == pytest.approx(r.mean(1).std(ddof=1) / 2)
