"""GRM's claim, measured: is a GRM proxy reward model harder to over-optimize than a plain one?

The design of GRM (arXiv 2406.10216, section 5.3), scaled down to the leak-free Taskmaster coffee
split (``taskmaster.load_splits``, seed 0) and the embedded base:

- **Gold reward model**: the stronger, on a validation split carved from train (never the test
  split), of a fully fine-tuned reward model (the PERL recipe's stage 1 without LoRA, BCE on all
  thumbs up/down rows) and TF-IDF + logistic regression; refit on all train rows. Its held-out
  ROC AUC on the test rows is ``gold_auc``.
- **Proxy reward models**: LoRA (r 16) + GRM's MLP head on a scarce subset (``--scarce_fraction``
  of train, drawn per seed). On thumbs up/down rows, the PERL recipe's stage 1 (its BCE, schedule
  and head init): ``baseline`` (``grm_alpha=0``: same head and init, no regularizer), ``sft`` at
  the paper's alpha 0.01, and ``sft_a0.001`` / ``sft_a0.1`` (one alpha point each side). GRM's
  dpo regularizers need chosen/rejected pairs: on the train preference pairs (stock
  ``trl.RewardTrainer``), ``pairs_baseline``, ``dpo`` and ``dpo_noref`` (alpha 0.01, beta 0.1).
  ``auc``: ROC AUC on the held-out thumbs up/down rows; ``pair_accuracy`` on held-out pairs.
- **Best-of-n**: ``--prompts`` held-out prompts, 32 completions each from the base policy, drawn
  once and reused for every n in {1, 2, 4, 8, 16, 32} by averaging over all n-subsets (unbiased,
  ``_bon.best_of_n``); proxy and gold score of the proxy's pick vs KL_bon = log n - (n-1)/n.
- **RL**: the PERL recipe's RLOO stage (``recipe_kit.rl_stage``, ``recipes/perl.yaml`` settings)
  against each proxy; at checkpoints, held-out prompts are sampled from the policy, scored by the
  gold model, and KL(policy || base) is estimated on those samples (sum over completion tokens of
  log pi - log pi_ref, a Monte-Carlo estimate of the sequence KL).

Seeds vary the scarce subset, the proxies' training, the samples and the RL; the gold model and
the split are fixed. Every number is the mean over seeds with its standard error (std / sqrt(seeds)).
Independent jobs (gold, one per seed) run as ``--jobs`` processes. Writes
``benchmarks/results/grm_bon.png``, ``grm_rl.png`` and ``grm_eval.json`` (unless ``--no_write``),
and prints one JSON object as its last line:
``{"gold_auc", "proxy": {"baseline": {"auc", "bon_gold": {n: ...}, "rl_gold_final", ...}, ...}, "goals", ...}``.

    nice -n 10 python benchmarks/grm_eval.py            # 3 seeds, 2 processes, <= 60 min on 2 cores
    nice -n 10 python benchmarks/grm_eval.py --quick    # 1 seed, fewer prompts and steps, <= 10 min
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _bon import best_of_n, completion_logps, completion_mask, kl_bon  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed  # noqa: E402

from perl_plugins import attach  # noqa: E402
from perl_plugins.data import taskmaster  # noqa: E402
from perl_plugins.data.defaults import default_dataset, trim_context  # noqa: E402
from perl_plugins.models.embedded import resolve_model  # noqa: E402
from perl_plugins.models.reward import load_reward_adapter, save_reward_adapter, score_texts  # noqa: E402
from perl_plugins.training import recipe_kit  # noqa: E402
from perl_plugins.training.reward_metrics import evaluate_pairs, roc_auc  # noqa: E402
from perl_plugins.training.sampling import sample_completions  # noqa: E402

NS = (1, 2, 4, 8, 16, 32)
RESULTS = Path(__file__).resolve().parent / "results"


def variants(alpha: float) -> dict[str, tuple[str, str, float]]:
    """Proxy name -> (data, grm_reg, grm_alpha). ``rows`` proxies are the PERL recipe's stage 1
    (BCE on thumbs up/down rows), where GRM's regularizer is sft on the thumbs-up completions; the
    sweep points sit a factor 10 each side of ``alpha``. GRM's dpo regularizers need chosen/rejected
    pairs: ``pairs`` proxies train on the preference pairs with their own baseline."""
    return {
        "baseline": ("rows", "sft", 0.0),
        "sft": ("rows", "sft", alpha),
        f"sft_a{alpha / 10:g}": ("rows", "sft", alpha / 10),
        f"sft_a{alpha * 10:g}": ("rows", "sft", alpha * 10),
        "pairs_baseline": ("pairs", "sft", 0.0),
        "dpo": ("pairs", "dpo", alpha),
        "dpo_noref": ("pairs", "dpo_noref", alpha),
    }


def chosen_variants(args: argparse.Namespace) -> dict[str, tuple[str, str, float]]:
    everything = variants(args.grm_alpha)
    if args.proxies == "all":
        return everything
    names = {"baseline", *(n for n in args.proxies.split(",") if n)}
    unknown = names - set(everything)
    if unknown:
        raise SystemExit(f"Unknown proxies {sorted(unknown)}; choose from {', '.join(everything)}.")
    if names & {"dpo", "dpo_noref"}:
        names.add("pairs_baseline")
    return {k: v for k, v in everything.items() if k in names}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Base model (path, hub id or alias); default: the embedded one.")
    p.add_argument("--config", default=None, help="PERL recipe YAML for the RL stage; default: recipes/perl.yaml.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="Worker processes (the gold model and each seed are jobs).")
    p.add_argument(
        "--scarce_fraction", type=float, default=0.25, help="Share of the train rows (and pairs) the proxies see."
    )
    p.add_argument("--grm_alpha", type=float, default=0.01, help="GRM's alpha (paper default); sweep at /10 and x10.")
    p.add_argument("--grm_beta", type=float, default=0.1)
    p.add_argument("--proxy_epochs", type=float, default=2.0)
    p.add_argument("--proxy_learning_rate", type=float, default=None, help="Default: the recipe's rm_learning_rate.")
    p.add_argument("--proxy_batch_size", type=int, default=16, help="Texts per step (a pair is two).")
    p.add_argument(
        "--proxies",
        default=None,
        help="Proxies to train (comma-separated names, or all; default all, sft with --quick); baseline always.",
    )
    p.add_argument("--gold_candidates", default="tfidf,rm_full", help="Gold kinds compared on the validation split.")
    p.add_argument("--gold_epochs", type=float, default=1.0, help="Epochs of the fully fine-tuned gold candidate.")
    p.add_argument(
        "--gold_learning_rate", type=float, default=1e-4, help="Learning rate of the fully fine-tuned gold candidate."
    )
    p.add_argument("--gold_rows", type=int, default=0, help="Train rows for the gold model (0: all).")
    p.add_argument("--prompts", type=int, default=64, help="Held-out prompts for best-of-n and the RL probes.")
    p.add_argument(
        "--rl_variants",
        default="baseline,sft",
        help="Proxies to run RL against (comma-separated, or all); each costs ~1/3 of a seed's time.",
    )
    p.add_argument("--rl_max_steps", type=int, default=None, help="RLOO steps; default: the recipe's rl_max_steps.")
    p.add_argument("--probe_every", type=int, default=4, help="RL steps between held-out gold probes.")
    p.add_argument("--probe_samples", type=int, default=1, help="Policy samples per held-out prompt at each probe.")
    p.add_argument("--quick", action="store_true", help="1 seed, 16 prompts, short training and RL (<= 10 min).")
    p.add_argument("--no_write", action="store_true", help="Do not write the plots and grm_eval.json.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "gold" or "seed:N" (internal)
    p.add_argument(
        "--work_dir",
        default=None,
        help="Keep the jobs' files here (default: a temporary dir) and reuse the jobs that finished there.",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.prompts, args.proxy_epochs, args.gold_rows = "0", 16, 1.0, args.gold_rows or 400
        args.rl_max_steps, args.probe_every, args.rl_variants = 4, 2, "baseline,sft"
    args.proxies = args.proxies or ("sft" if args.quick else "all")
    return args


def recipe_config(args: argparse.Namespace, seed: int, output_dir: str) -> Any:
    """``recipes/perl.yaml`` with this run's seed and RL length; the stage's own before/after
    evaluation is cut to a token size (the probes replace it)."""
    from perl_plugins.recipes import perl
    from trl import TrlParser

    config = args.config or str(Path(perl.__file__).with_suffix(".yaml"))
    cli = [
        "--config",
        config,
        "--output_dir",
        output_dir,
        "--seed",
        str(seed),
        "--rl_eval_prompts",
        "4",
        "--rl_eval_samples",
        "2",
    ]
    if args.model:
        cli += ["--model_name_or_path", args.model]
    if args.rl_max_steps is not None:
        cli += ["--rl_max_steps", str(args.rl_max_steps)]
    (cfg,) = TrlParser([perl.PerlConfig]).parse_args_and_config(cli)
    return cfg


def tokenizer_for(model_path: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def held_out_prompts(cfg: Any, count: int) -> list[str]:
    return list(dict.fromkeys(default_dataset("rloo", context_turns=cfg.context_turns)["test"]["prompt"]))[:count]


# --- gold ------------------------------------------------------------------------------------


def _tfidf() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    return make_pipeline(
        make_union(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True),
        ),
        LogisticRegression(C=4.0, max_iter=2000, random_state=0),
    )


def fit_gold(kind: str, cfg: Any, model_path: str, train: list, save_to: str | None = None) -> Any:
    """A fitted gold candidate: a TF-IDF pipeline or a fully fine-tuned reward model."""
    texts = [r.prompt + r.completion for r in train]
    if kind == "tfidf":
        model = _tfidf().fit(texts, [r.label for r in train])
        if save_to:
            Path(save_to).mkdir(parents=True, exist_ok=True)
            (Path(save_to) / "tfidf.pkl").write_bytes(pickle.dumps(model))
        return model
    tokenizer = tokenizer_for(model_path)
    full = dataclasses.replace(cfg, rm_learning_rate=cfg.rm_full_learning_rate, rm_epochs=cfg.rm_epochs)
    set_seed(cfg.seed)
    trainer = recipe_kit.reward_trainer(
        full, model_path, tokenizer, taskmaster.pointwise(train).shuffle(seed=0), None, plugins=""
    )
    trainer.train()
    model = trainer.model.eval()
    if save_to:
        trainer.save_model(save_to)
        tokenizer.save_pretrained(save_to)
    return model


class Gold:
    """Scores prompt + completion texts with the saved gold model (either kind)."""

    def __init__(self, path: str, max_length: int) -> None:
        self.max_length = max_length
        pickled = Path(path) / "tfidf.pkl"
        if pickled.is_file():
            self.tfidf, self.model = pickle.loads(pickled.read_bytes()), None
        else:
            from transformers import AutoModelForSequenceClassification

            self.tfidf = None
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
            self.tokenizer = tokenizer_for(path)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.tfidf is not None:
            return np.asarray(self.tfidf.decision_function(texts), dtype=np.float64)
        return score_texts(self.model, self.tokenizer, texts, 32, self.max_length).double().numpy()


def gold_worker(args: argparse.Namespace, model_path: str, work: Path) -> dict[str, Any]:
    """Pick the gold kind on a validation split of train, refit it on all train rows, report test AUC."""
    cfg = recipe_config(args, 0, str(work / "gold_run"))
    cfg = dataclasses.replace(cfg, rm_epochs=args.gold_epochs, rm_full_learning_rate=args.gold_learning_rate)
    splits = taskmaster.load_splits()
    trim = lambda rows: [dataclasses.replace(r, prompt=trim_context(r.prompt, cfg.context_turns)) for r in rows]
    train, test = trim(splits["train"]), trim(splits["test"])
    if args.gold_rows and args.gold_rows < len(train):
        pick = np.random.default_rng(0).choice(len(train), args.gold_rows, replace=False)
        train = [train[i] for i in sorted(pick)]
    inner = taskmaster.split_rows(train, test_fraction=0.15, seed=1)

    def auc(kind: str, fit_rows: list, eval_rows: list, save_to: str | None = None) -> float:
        fit_gold(kind, cfg, model_path, fit_rows, save_to)
        scores = Gold(save_to, cfg.max_length)([r.prompt + r.completion for r in eval_rows])
        return roc_auc(scores, np.asarray([r.label for r in eval_rows]))

    kinds = [k for k in args.gold_candidates.split(",") if k]
    validation = {kind: auc(kind, inner["train"], inner["test"], str(work / f"gold_val_{kind}")) for kind in kinds}
    kind = max(validation, key=validation.get)
    test_auc = auc(kind, train, test, str(work / "gold"))
    return {
        "kind": kind,
        "validation_auc": validation,
        "test_auc": test_auc,
        "train_rows": len(train),
        "validation_rows": len(inner["test"]),
        "test_rows": len(test),
        "epochs_if_rm_full": args.gold_epochs,
        "learning_rate_if_rm_full": args.gold_learning_rate,
    }


# --- proxies ---------------------------------------------------------------------------------


def train_proxy(
    name: str, variant: tuple[str, str, float], args: argparse.Namespace, cfg: Any, model_path: str, data: dict
) -> tuple[Any, float]:
    """One LoRA proxy with GRM's MLP head on the scarce ``rows`` or ``pairs``: its trainer, trained, and loss.
    Every proxy of a seed starts from identical weights: the trainer's seed is set before ``attach``
    builds the head and LoRA."""
    kind, reg, alpha = variant
    grm = {"grm_head": "mlp", "grm_reg": reg, "grm_alpha": alpha, "grm_beta": args.grm_beta}
    lr = args.proxy_learning_rate or cfg.rm_learning_rate
    out = os.path.join(cfg.output_dir, f"proxy-{name}")
    tokenizer = tokenizer_for(model_path)
    if kind == "rows":  # the PERL recipe's stage 1 (its schedule and head init), on the scarce rows
        stage = dataclasses.replace(
            cfg,
            output_dir=out,
            rm_epochs=args.proxy_epochs,
            rm_learning_rate=lr,
            rm_batch_size=args.proxy_batch_size,
            plugin_options=json.dumps(grm),
        )
        trainer = recipe_kit.reward_trainer(stage, model_path, tokenizer, data["rows"], None, plugins="lora,grm")
    else:
        from trl import RewardConfig, RewardTrainer

        from perl_plugins.training.pointwise import reward_classifier

        config = RewardConfig(
            output_dir=out,
            num_train_epochs=args.proxy_epochs,
            per_device_train_batch_size=max(1, args.proxy_batch_size // 2),
            learning_rate=lr,
            max_length=cfg.max_length,
            gradient_checkpointing=False,
            seed=cfg.seed,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = RewardTrainer(
            model=reward_classifier(model_path), args=config, train_dataset=data["pairs"], processing_class=tokenizer
        )
        attach(trainer, plugins="lora,grm", lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, **grm)
    return trainer, trainer.train().training_loss


def proxy_metrics(
    trainer: Any, loss: float, tokenizer: Any, data: dict, save_to: str, started: float
) -> dict[str, Any]:
    """A trained proxy's held-out metrics (ROC AUC on the thumbs rows, accuracy on the pairs); the
    adapter saved to ``save_to`` as the RL stage loads it."""
    model = trainer.model.eval()
    pairs = evaluate_pairs(model, tokenizer, data["test_pairs"])
    rows = data["test_rows"]
    row_scores = score_texts(model, tokenizer, [p + c for p, c in zip(rows["prompt"], rows["completion"])]).numpy()
    save_reward_adapter(model, save_to, model.active_adapter)
    return {
        "auc": roc_auc(row_scores, np.asarray(rows["label"])),
        "pair_accuracy": pairs["eval_pair_accuracy"],
        "pair_auc": pairs["eval_auc"],
        "train_loss": loss,
        "train_s": time.perf_counter() - started,
        "train_examples": len(trainer.train_dataset),
    }


# --- RL probes -------------------------------------------------------------------------------


class HeldOutProbe(TrainerCallback):
    """At step 0 and every ``every`` steps: ``samples`` completions per held-out prompt from the
    policy (fixed sampling seed), their texts, and per-sample KL(policy || reference) estimates
    (sum of log pi - log pi_ref over the completion's tokens; reference = adapters off)."""

    def __init__(
        self, tokenizer: Any, prompts: list[str], samples: int, max_new_tokens: int, every: int, seed: int
    ) -> None:
        self.tokenizer, self.prompts, self.samples = tokenizer, prompts, samples
        self.max_new_tokens, self.every, self.seed = max_new_tokens, every, seed
        self.records: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.probe(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        due = state.global_step % self.every == 0 or state.global_step == state.max_steps
        if due and (not self.records or self.records[-1]["step"] != state.global_step):
            self.probe(model, state.global_step)

    @torch.no_grad()
    def probe(self, model: Any, step: int) -> None:
        if "reward" == getattr(model, "active_adapter", None):
            raise RuntimeError("HeldOutProbe: the reward adapter is active, expected the policy.")
        tok, was_training = self.tokenizer, model.training
        model.eval()
        flat = [p for p in self.prompts for _ in range(self.samples)]
        texts, kls = [], []
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 7919)
                for start in range(0, len(flat), 32):
                    batch = tok(flat[start : start + 32], return_tensors="pt", padding=True, padding_side="left")
                    out = model.generate(
                        **batch,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=True,
                        temperature=1.0,
                        pad_token_id=tok.pad_token_id,
                    )
                    width = batch["input_ids"].shape[1]
                    generated = out[:, width:]
                    mask = torch.cat([batch["attention_mask"], completion_mask(generated, tok.eos_token_id)], dim=1)
                    policy = completion_logps(model, out, mask, width)
                    with model.disable_adapter():
                        reference = completion_logps(model, out, mask, width)
                    kls.extend((policy - reference).tolist())
                    texts.extend(tok.batch_decode(generated, skip_special_tokens=True))
        finally:
            model.train(was_training)
        self.records.append({"step": step, "prompts": flat, "completions": texts, "kl": kls})


def rl_run(
    name: str,
    seed: int,
    args: argparse.Namespace,
    cfg: Any,
    model_path: str,
    tokenizer: Any,
    prompts: list[str],
    reward_dir: str,
) -> list[dict[str, Any]]:
    """The recipe's RLOO stage against one proxy; the probes, with proxy scores of their texts."""
    probe = HeldOutProbe(tokenizer, prompts, args.probe_samples, cfg.rl_max_completion_length, args.probe_every, seed)
    set_seed(seed)
    rl_cfg = dataclasses.replace(cfg, output_dir=os.path.join(cfg.output_dir, f"rl-{name}"))
    metrics, _, _ = recipe_kit.rl_stage(rl_cfg, model_path, tokenizer, reward_dir, callbacks=[probe])
    texts = [p + c for r in probe.records for p, c in zip(r["prompts"], r["completions"])]
    scores = iter(adapter_scores(model_path, tokenizer, reward_dir, texts))
    for record in probe.records:
        record["proxy"] = [next(scores) for _ in record["completions"]]
    probe.records[-1]["trl_final_kl"] = metrics["rl_final_kl"]
    return probe.records


def base_samples(args: argparse.Namespace, model_path: str, work: Path) -> None:
    """The best-of-n pool: 32 completions per held-out prompt from the base policy, drawn once
    (fixed seed) and shared by every seed and proxy; written to ``work/samples.json``."""
    cfg = recipe_config(args, 0, str(work / "samples_run"))
    prompts = held_out_prompts(cfg, args.prompts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(104729)
        completions = sample_completions(
            AutoModelForCausalLM.from_pretrained(model_path),
            tokenizer_for(model_path),
            prompts,
            max(NS),
            cfg.rl_max_completion_length,
            batch_size=64,
            desc="Best-of-n samples",
        )
    partial = work / "samples.json.part"
    partial.write_text(json.dumps({"prompts": prompts, "completions": completions}))
    partial.rename(work / "samples.json")  # atomic: seed workers poll for it


def wait_for(path: Path, timeout_s: float = 3600) -> Path:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f}s (did the gold job fail?).")
        time.sleep(5)
    return path


def adapter_scores(model_path: str, tokenizer: Any, adapter_dir: str, texts: list[str]) -> list[float]:
    """Scores of ``texts`` by a saved reward adapter, loaded as the RL stage loads it."""
    scorer = load_reward_adapter(AutoModelForCausalLM.from_pretrained(model_path), adapter_dir).eval()
    return score_texts(scorer, tokenizer, texts, batch_size=64).double().numpy().tolist()


def scarce(dataset: Any, fraction: float, seed: int) -> Any:
    """``fraction`` of ``dataset``'s rows, drawn per seed."""
    take = max(1, round(fraction * len(dataset)))
    return dataset.select(sorted(np.random.default_rng(seed).choice(len(dataset), take, replace=False)))


def seed_worker(args: argparse.Namespace, seed: int, model_path: str, work: Path) -> dict[str, Any]:
    cfg = recipe_config(args, seed, str(work / f"seed{seed}"))
    tokenizer = tokenizer_for(model_path)
    pairs = default_dataset("reward", feedback="pairs", context_turns=cfg.context_turns)
    rows = default_dataset("reward", context_turns=cfg.context_turns)
    data = {
        "rows": scarce(rows["train"], args.scarce_fraction, seed).shuffle(seed=seed),
        "pairs": scarce(pairs["train"], args.scarce_fraction, seed),
        "test_pairs": pairs["test"],
        "test_rows": rows["test"],
    }
    out: dict[str, Any] = {"seed": seed, "proxies": {}, "rl": {}}
    chosen = chosen_variants(args)
    adapters = {name: str(work / f"seed{seed}" / f"adapter-{name}") for name in chosen}
    for name, variant in chosen.items():
        started = time.perf_counter()
        trainer, loss = train_proxy(name, variant, args, cfg, model_path, data)
        out["proxies"][name] = proxy_metrics(trainer, loss, tokenizer, data, adapters[name], started)
        out["proxies"][name]["data"] = variant[0]
        log(
            f"seed {seed} proxy {name}: auc {out['proxies'][name]['auc']:.3f}, "
            f"pair acc {out['proxies'][name]['pair_accuracy']:.3f}, {out['proxies'][name]['train_s']:.0f}s"
        )
        del trainer
    samples = json.loads(wait_for(work / "samples.json").read_text())
    texts = [p + c for p, cs in zip(samples["prompts"], samples["completions"]) for c in cs]
    for name, adapter in adapters.items():
        out["proxies"][name]["bon_proxy_scores"] = adapter_scores(model_path, tokenizer, adapter, texts)
    log(f"seed {seed}: best-of-n pool scored by every proxy")
    rl_names = list(adapters) if args.rl_variants == "all" else [n for n in args.rl_variants.split(",") if n]
    for name in rl_names:
        started = time.perf_counter()
        out["rl"][name] = rl_run(name, seed, args, cfg, model_path, tokenizer, samples["prompts"], adapters[name])
        log(
            f"seed {seed} RL {name}: final KL {np.mean(out['rl'][name][-1]['kl']):.3f}, "
            f"{time.perf_counter() - started:.0f}s"
        )
    return out


# --- aggregation -----------------------------------------------------------------------------


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (NaN with one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.nan


def aggregate(samples: dict[str, Any], runs: list[dict[str, Any]], gold: Gold) -> dict[str, Any]:
    """Gold-score every sampled text; per proxy, best-of-n and RL curves, mean and SE over seeds."""
    per_seed: dict[str, list[dict[str, Any]]] = {}
    shape = (len(samples["prompts"]), len(samples["completions"][0]))
    gold_bon = gold([p + c for p, cs in zip(samples["prompts"], samples["completions"]) for c in cs]).reshape(shape)
    for run in runs:
        for name, proxy in run["proxies"].items():
            scores = np.asarray(proxy["bon_proxy_scores"]).reshape(shape)
            entry = {
                "auc": proxy["auc"],
                "pair_accuracy": proxy["pair_accuracy"],
                "bon_gold": {n: float(best_of_n(scores, gold_bon, n).mean()) for n in NS},
                "bon_proxy_gain": {n: float((best_of_n(scores, scores, n) - scores.mean(axis=1)).mean()) for n in NS},
            }
            if name in run["rl"]:
                entry["rl"] = [
                    {
                        "step": r["step"],
                        "kl": float(np.mean(r["kl"])),
                        "gold": float(gold([p + c for p, c in zip(r["prompts"], r["completions"])]).mean()),
                        "proxy_gain": float(np.mean(r["proxy"]) - np.mean(run["rl"][name][0]["proxy"])),
                    }
                    for r in run["rl"][name]
                ]
            per_seed.setdefault(name, []).append(entry)
    out: dict[str, Any] = {}
    for name, entries in per_seed.items():
        row: dict[str, Any] = {}
        for key in ("auc", "pair_accuracy"):
            row[key], row[key + "_se"] = mean_se([e[key] for e in entries])
        for key in ("bon_gold", "bon_proxy_gain"):
            stats = {n: mean_se([e[key][n] for e in entries]) for n in NS}
            row[key] = {str(n): s[0] for n, s in stats.items()}
            row[key + "_se"] = {str(n): s[1] for n, s in stats.items()}
        if all("rl" in e for e in entries):
            curve = []
            for i, point in enumerate(entries[0]["rl"]):
                stats = {k: mean_se([e["rl"][i][k] for e in entries]) for k in ("kl", "gold", "proxy_gain")}
                curve.append(
                    {
                        "step": point["step"],
                        **{k: s[0] for k, s in stats.items()},
                        **{k + "_se": s[1] for k, s in stats.items()},
                    }
                )
            row["rl"] = curve
            row["rl_gold_final"], row["rl_gold_final_se"] = curve[-1]["gold"], curve[-1]["gold_se"]
            row["rl_gold_start"], row["rl_kl_final"] = curve[0]["gold"], curve[-1]["kl"]
        row["per_seed"] = [
            {k: e[k] for k in ("auc", "pair_accuracy")}
            | {"bon_gold_32": e["bon_gold"][32]}
            | ({"rl_gold_final": e["rl"][-1]["gold"]} if "rl" in e else {})
            for e in entries
        ]
        out[name] = row
    return out


def goals(proxy: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals: sft beats baseline by more than the sum of the standard errors."""
    sft, base = proxy.get("sft"), proxy.get("baseline")
    if not sft or not base:
        return {}

    def beats(key: str, se_key: str, index: str | None = None) -> bool:
        value = lambda r, k: r[k][index] if index else r[k]
        return value(sft, key) - value(base, key) > value(sft, se_key) + value(base, se_key)

    out = {
        "sft_bon_gold_32_beats_baseline": beats("bon_gold", "bon_gold_se", "32"),
        "sft_auc_ge_baseline": sft["auc"] >= base["auc"],
    }
    if "rl_gold_final" in sft and "rl_gold_final" in base:
        out["sft_rl_gold_final_beats_baseline"] = beats("rl_gold_final", "rl_gold_final_se")
    return out


# --- plots -----------------------------------------------------------------------------------


def plot_bon(proxy: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [kl_bon(n) for n in NS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, row in proxy.items():
        for axis, key in ((left, "bon_proxy_gain"), (right, "bon_gold")):
            ys = [row[key][str(n)] for n in NS]
            err = [0 if math.isnan(e) else e for e in (row[key + "_se"][str(n)] for n in NS)]
            axis.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    left.set(
        title="proxy score gain of the proxy's pick",
        xlabel="KL_bon = log n - (n-1)/n",
        ylabel="proxy score - mean (n=1)",
    )
    right.set(title="gold score of the proxy's pick", xlabel="KL_bon = log n - (n-1)/n", ylabel="gold score")
    right.legend(fontsize=8)
    fig.suptitle("Best-of-n on held-out prompts, n = 1..32 (mean ± SE over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rl(proxy: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, row in proxy.items():
        if "rl" not in row:
            continue
        xs, xerr = [p["kl"] for p in row["rl"]], [0 if math.isnan(p["kl_se"]) else p["kl_se"] for p in row["rl"]]
        for axis, key in ((left, "proxy_gain"), (right, "gold")):
            err = [0 if math.isnan(p[key + "_se"]) else p[key + "_se"] for p in row["rl"]]
            axis.errorbar(xs, [p[key] for p in row["rl"]], xerr=xerr, yerr=err, marker="o", capsize=3, label=name)
    left.set(
        title="proxy score gain (held-out samples)",
        xlabel="KL(policy || base), nats per completion",
        ylabel="proxy gain",
    )
    right.set(
        title="gold score (held-out samples)", xlabel="KL(policy || base), nats per completion", ylabel="gold score"
    )
    right.legend(fontsize=8)
    fig.suptitle("PERL RLOO against each proxy, probes every few steps (mean ± SE over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- driver ----------------------------------------------------------------------------------


def finite(value: Any) -> Any:
    """``value`` with NaN (a standard error of one seed) as None, so the JSON line is strict JSON."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def log(message: str) -> None:
    print(f"[grm_eval {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_jobs(jobs: list[str], argv: list[str], work: Path, parallel: int) -> None:
    """Each job (``gold``, ``seed:N``) in its own process, ``parallel`` at a time; logs in ``work``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            logfile = open(work / f"{job.replace(':', '')}.log", "w")  # noqa: SIM115 (closed when the job ends)
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", job, "--work_dir", str(work)]
            running.append((job, subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env), logfile))
            log(f"started {job}")
        time.sleep(2)
        for item in list(running):
            job, proc, logfile = item
            if proc.poll() is None:
                continue
            logfile.close()
            running.remove(item)
            if proc.returncode != 0:
                for _, other, _ in running:
                    other.terminate()
                tail = (work / f"{job.replace(':', '')}.log").read_text()[-4000:]
                raise SystemExit(f"grm_eval worker {job} failed ({proc.returncode}):\n{tail}")
            log(f"finished {job}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(1)
    model_path = resolve_model(args.model)
    if args.worker:
        work = Path(args.work_dir)
        if args.worker == "gold":  # the best-of-n pool first: the seed workers wait for it
            base_samples(args, model_path, work)
            result = gold_worker(args, model_path, work)
        else:
            result = seed_worker(args, int(args.worker.split(":")[1]), model_path, work)
        (work / f"{args.worker.replace(':', '')}.json").write_text(json.dumps(result))
        return result
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="grm_eval_") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        jobs = [
            job
            for job in ("gold", *(f"seed:{s}" for s in seeds))
            if not (work / f"{job.replace(':', '')}.json").exists()
        ]
        run_jobs(jobs, argv, work, args.jobs)
        gold_info = json.loads((work / "gold.json").read_text())
        cfg = recipe_config(args, 0, tmp)
        gold = Gold(str(work / "gold"), cfg.max_length)
        runs = [json.loads((work / f"seed{s}.json").read_text()) for s in seeds]
        proxy = aggregate(json.loads((work / "samples.json").read_text()), runs, gold)
    settings = {
        k: getattr(args, k)
        for k in (
            "scarce_fraction",
            "grm_alpha",
            "grm_beta",
            "proxy_epochs",
            "proxy_learning_rate",
            "proxy_batch_size",
            "gold_epochs",
            "prompts",
            "rl_max_steps",
            "probe_every",
            "probe_samples",
            "quick",
            "gold_candidates",
        )
    }
    settings.update(
        rl_max_steps=cfg.rl_max_steps,
        proxy_learning_rate=args.proxy_learning_rate or cfg.rm_learning_rate,
        model=model_path,
        seeds=seeds,
        variants={k: {"data": d, "grm_reg": r, "grm_alpha": a} for k, (d, r, a) in chosen_variants(args).items()},
        proxy=(
            f"LoRA r {cfg.lora_r} + GRM's MLP head; rows: the PERL recipe's stage 1 (BCE on thumbs rows), "
            "pairs: trl RewardTrainer"
        ),
        bon_samples_per_prompt=max(NS),
        rl=(
            f"recipes/perl.yaml RLOO stage (lr {cfg.rl_learning_rate:g}, beta {cfg.rl_beta:g}, "
            f"batch {cfg.rl_batch_size}, k {cfg.rl_num_generations}, {cfg.rl_max_completion_length} tokens)"
        ),
        scarce_rows=runs[0]["proxies"]["baseline"]["train_examples"],
        scarce_pairs=next((p["train_examples"] for p in runs[0]["proxies"].values() if p["data"] == "pairs"), 0),
        command="python benchmarks/grm_eval.py " + shlex.join(argv),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    result = {
        "gold_auc": gold_info["test_auc"],
        "gold": gold_info,
        "proxy": proxy,
        "goals": goals(proxy),
        "kl_bon": {str(n): kl_bon(n) for n in NS},
        "settings": settings,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot_bon(proxy, RESULTS / "grm_bon.png")
        plot_rl(proxy, RESULTS / "grm_rl.png")
        (RESULTS / "grm_eval.json").write_text(json.dumps(finite(result), indent=1, allow_nan=False) + "\n")
        log(f"wrote {RESULTS / 'grm_bon.png'}, {RESULTS / 'grm_rl.png'}, {RESULTS / 'grm_eval.json'}")
    print(json.dumps(finite(result), allow_nan=False), flush=True)
    return result


if __name__ == "__main__":
    main()
