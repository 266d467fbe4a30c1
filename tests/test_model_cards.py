"""Model cards on what the CLI and ``export`` save, and stock loaders reading what we save in a
process where perl_plugins cannot be imported at all."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from perl_plugins.cli import main as cli_main
from perl_plugins.models.card import (
    TASKMASTER_ATTRIBUTION,
    read_card,
    training_data,
    write_model_card,
)
from perl_plugins.models.reward import load_reward_adapter, score

TINY_RUN = [
    "--model_size",
    "tiny",
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--max_train_samples",
    "16",
    "--max_eval_samples",
    "64",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "2",
    "--use_cpu",
    "--report_to",
    "none",
]
IDS = [[5, 17, 42, 99, 7, 3, 250, 11]]
# Stock loaders only: any import of perl_plugins in this process fails.
NO_PERL_PLUGINS = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "perl_plugins" or name.startswith("perl_plugins."):
            raise ImportError("perl_plugins must not be needed to load this")
sys.meta_path.insert(0, _Blocked())
"""


def _stock_load(code: str, tmp_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", NO_PERL_PLUGINS + code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card[4 : card.index("\n---", 4)])


def test_cli_reward_adapter_card_and_stock_loading(tmp_path):
    out = tmp_path / "rm"
    argv = ["reward", "--plugins", "lora", "--output_dir", str(out), "--save_strategy", "no", *TINY_RUN]
    assert cli_main(argv) == 0
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "perl-plugins" in meta["tags"] and "lora" in meta["tags"]
    facts = meta["perl_plugins"]
    assert facts["kind"] == "reward adapter"
    assert re.fullmatch(r"[0-9a-f]{16}", facts["fingerprint"])
    assert facts["fingerprint"] == json.loads((out / "perl_reward_head.json").read_text())["base"]["fingerprint"]
    assert facts["plugins"] == ["lora"] and facts["options"]["lora"]["lora_r"] == 16
    final = json.loads((out / "final_metrics.json").read_text())
    assert json.dumps(facts["metrics"], sort_keys=True) == json.dumps(final, sort_keys=True)  # NaN-safe
    assert "eval_auc" in card
    assert TASKMASTER_ATTRIBUTION in card
    assert "reward --plugins lora" in facts["command"]

    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    stock = _stock_load(
        "import json, torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForSequenceClassification\n"
        f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=1)\n"
        f"model = PeftModel.from_pretrained(base, {str(out)!r}).eval()\n"
        f"with torch.no_grad(): print(json.dumps(model(input_ids=torch.tensor({IDS})).logits[:, 0].tolist()))\n",
        tmp_path,
    )
    # Our own scorer (decoder + score head, last token) on the same adapter gives the same reward.
    ours = load_reward_adapter(AutoModelForCausalLM.from_pretrained(base), out, adapter_name="reward").eval()
    with torch.no_grad():
        expected = score(ours, torch.tensor(IDS), torch.ones(1, len(IDS[0]), dtype=torch.long))
    assert stock == pytest.approx(expected.tolist(), abs=1e-5)


def test_export_cards_and_stock_loading(tmp_path):
    out = tmp_path / "sft"
    argv = [
        "sft",
        "--plugins",
        "lora,adapter_ckpt",
        "--output_dir",
        str(out),
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--max_length",
        "96",
        *TINY_RUN,
    ]
    assert cli_main(argv) == 0
    run_card = read_card(out)
    assert run_card["kind"] == "adapter" and run_card["plugins"] == ["lora", "adapter_ckpt"]
    ckpt = out / "checkpoint-2"
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "adapter")]) == 0
    assert cli_main(["export", str(ckpt), "--merge", "--out", str(tmp_path / "merged")]) == 0
    for name, kind, library in (("adapter", "adapter", "peft"), ("merged", "model", "transformers")):
        card = (tmp_path / name / "README.md").read_text()
        facts = _front_matter(card)["perl_plugins"]
        assert facts["kind"] == kind and _front_matter(card)["library_name"] == library
        assert facts["training_command"] == run_card["command"] and "export" in facts["command"]
        assert facts["data"] == training_data() and TASKMASTER_ATTRIBUTION in card
        assert set(facts["plugins"]) == {"lora", "adapter_ckpt"} and "eval_loss" in facts["metrics"]
        assert re.fullmatch(r"[0-9a-f]{16}", facts["fingerprint"])

    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    logits = _stock_load(
        "import json, torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f"ids = torch.tensor({IDS})\nout = {{}}\n"
        "with torch.no_grad():\n"
        f"    merged = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        "    out['merged'] = merged(input_ids=ids).logits[0, -1, :8].tolist()\n"
        f"    for name, path in (('adapter', {str(tmp_path / 'adapter')!r}), ('final', {str(out)!r})):\n"
        f"        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), path).eval()\n"
        "        out[name] = model(input_ids=ids).logits[0, -1, :8].tolist()\n"
        "print(json.dumps(out))\n",
        tmp_path,
    )
    assert logits["adapter"] == pytest.approx(logits["merged"], abs=1e-4)
    assert logits["final"] == pytest.approx(logits["adapter"], abs=1e-6)  # step 2 is the end of training


def test_card_steps_add_to_each_other(tmp_path):
    """A card written at save time keeps its facts when a later step adds the metrics."""
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "org/base", "task_type": "CAUSAL_LM"})
    )
    write_model_card(
        tmp_path,
        fingerprint="0123456789abcdef",
        plugins=["lora"],
        options={"lora": {"lora_r": 4}},
        data=training_data(taskmaster_file="mine.jsonl"),
        command="python x.py",
    )
    write_model_card(tmp_path, metrics={"eval_loss": 0.5})
    card = (tmp_path / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "org/base"  # a hub id goes to the metadata; a local path would not
    assert meta["perl_plugins"]["fingerprint"] == "0123456789abcdef"
    assert meta["perl_plugins"]["metrics"] == {"eval_loss": 0.5} and meta["perl_plugins"]["command"] == "python x.py"
    assert "`mine.jsonl`" in card and TASKMASTER_ATTRIBUTION not in card  # not our data: no attribution
    assert "PeftModel.from_pretrained" in card
