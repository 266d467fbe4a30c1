"""Model cards (``README.md``, the Hugging Face convention) for every adapter, reward adapter and
model that the CLI, ``export`` or a recipe saves: base model and fingerprint, plugins and their
options, training data (with the Taskmaster attribution when it is ours), held-out metrics, and
the exact command.

A card is written in steps: when the weights are saved (the model is in memory: its base
fingerprint is taken then) and again when the run's held-out metrics are known. What a step knows
is kept in the card's YAML metadata under ``perl_plugins``, so a later step adds to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from perl_plugins.models.reward import HEAD_SPEC_FILE

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"(?!\.)[\w.-]+(/[\w.-]+)?")  # "org/name": what the card metadata's base_model may hold
NO_FINGERPRINT = "not recorded (full fine-tuning changes the base weights)"
_DATA_URL = "https://github.com/google-research-datasets/Taskmaster"
TASKMASTER_ATTRIBUTION = (
    "Taskmaster coffee thumbs up/down feedback (TM-4-2024, released with the PERL paper, arXiv:2403.10704) "
    f"by Bill Byrne and Saravanan Ganesh, Google LLC, from [{_DATA_URL}]({_DATA_URL}); licensed under "
    "[CC BY 4.0](https://creativecommons.org/licenses/by/4.0/); re-packed as gzip'd JSON lines, nothing else changed."
)


def training_data(taskmaster_file: str | None = None, dataset_name: str | None = None) -> dict[str, Any]:
    """What a run trained on, as a card records it: a hub dataset, a Taskmaster-format file of the
    user's, or the shipped Taskmaster coffee feedback (``ours``: its attribution goes in the card)."""
    if dataset_name:
        return {"source": f"the Hugging Face dataset `{dataset_name}`", "ours": False}
    if taskmaster_file:
        return {"source": f"the Taskmaster-format feedback file `{taskmaster_file}`", "ours": False}
    return {"source": "the Taskmaster coffee feedback shipped with perl-plugins", "ours": True}


_INVOKED_AS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("perl_plugins_invoked_as", default=None)


@contextlib.contextmanager
def invoked_as(argv: list[str]) -> Iterator[None]:
    """Inside the block, :func:`current_command` is ``argv`` (the CLI's own command line, also when
    ``perl_plugins.cli.main`` is called from Python)."""
    token = _INVOKED_AS.set(list(argv))
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


def current_command() -> str:
    """The command line of this process, as a user would type it again."""
    if _INVOKED_AS.get() is not None:
        return shlex.join(_INVOKED_AS.get())
    argv0 = sys.argv[0] if sys.argv else ""
    name = Path(argv0).name
    if name == "cli.py" and Path(argv0).parent.name == "perl_plugins":
        head = ["python", "-m", "perl_plugins.cli"]
    else:
        head = ["python", argv0]
    return shlex.join([*head, *sys.argv[1:]])


def base_fingerprint_id(model: Any) -> str:
    """The fingerprint of ``model``'s shared backbone (the id a reward adapter records, so a policy
    and a reward adapter trained on one base carry the same one)."""
    from perl_plugins.models.reward import base_description

    return base_description(model)["fingerprint"]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def trainer_plugins(trainer: Any) -> tuple[list[str], dict[str, Any]]:
    """The plugins attached to ``trainer`` and their options (empty when none are)."""
    attached = getattr(trainer, "perl_plugins", None)
    if attached is None:
        return [], {}
    return list(attached.names), {name: _jsonable(opts) for name, opts in attached.options.items() if opts is not None}


def read_card(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``perl_plugins`` metadata of a card written here, or ``{}``."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return {}
    text = path.read_text()
    if not text.startswith("---\n"):
        return {}
    front = yaml.safe_load(text[4 : text.index("\n---", 4)]) or {}
    return dict(front.get("perl_plugins") or {})


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _saved_facts(directory: Path) -> dict[str, Any]:
    """What the saved files themselves say: kind, base model, recorded fingerprint, head."""
    adapter = _read_json(directory / "adapter_config.json")
    head = _read_json(directory / HEAD_SPEC_FILE)
    config = _read_json(directory / "config.json")
    if adapter:
        reward = bool(head) or adapter.get("task_type") == "SEQ_CLS"
        facts = {
            "kind": "reward adapter" if reward else "adapter",
            "base_model": adapter.get("base_model_name_or_path"),
        }
        if head.get("base"):  # save_reward_adapter records it; a checkpoint's manifest holds its own
            facts["fingerprint"] = head["base"]["fingerprint"]
            facts["head"] = head["head"]
        return facts
    architectures = config.get("architectures") or []
    reward = any(a.endswith("ForSequenceClassification") for a in architectures)
    return {"kind": "reward model" if reward else "model", "base_model": config.get("_name_or_path") or None}


def write_model_card(
    directory: str | os.PathLike,
    *,
    model: Any = None,
    trainer: Any = None,
    base_model: str | None = None,
    fingerprint: str | None = None,
    plugins: list[str] | None = None,
    options: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    command: str | None = None,
    training_command: str | None = None,
    write: bool = True,
) -> Path:
    """Write (or complete) ``directory/README.md``. Arguments left ``None`` keep what an earlier
    card here recorded; ``trainer`` gives the model, plugins and options; ``model`` the base
    fingerprint. Under DeepSpeed ZeRO-3 the fingerprint is a collective: every process calls this
    and only those with ``write`` write. Returns the card's path."""
    directory = Path(directory)
    if trainer is not None:
        model = trainer.model if model is None else model
        if plugins is None and options is None:
            plugins, options = trainer_plugins(trainer)
    if fingerprint is None and model is not None and hasattr(model, "peft_config"):
        # Only a frozen base (adapters on top) is still the base after training.
        fingerprint = base_fingerprint_id(model)
    path = directory / CARD_FILE
    if not write:
        return path
    facts = {**_saved_facts(directory), **read_card(directory)}
    if base_model is None and not facts.get("base_model") and model is not None:
        base_model = getattr(getattr(model, "config", None), "name_or_path", None) or None
    given = {
        "base_model": base_model,
        "fingerprint": fingerprint,
        "plugins": plugins,
        "options": _jsonable(options) if options is not None else None,
        "data": data,
        "metrics": _jsonable(metrics) if metrics is not None else None,
        "command": command,
        "training_command": training_command,
    }
    facts.update({k: v for k, v in given.items() if v is not None})
    facts.setdefault("command", current_command())
    path.write_text(render(facts))
    return path


def write_export_card(checkpoint: str | os.PathLike, out: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """The card of ``perl-plugins export`` output: base, fingerprint and plugins from the
    checkpoint's manifest, its last held-out metrics, and the training run's data and command
    when that run's own card sits next to the checkpoint."""
    checkpoint = Path(checkpoint)
    state = _read_json(checkpoint / "trainer_state.json")
    evals = [log for log in state.get("log_history", []) if any(k.startswith("eval_") for k in log)]
    metrics = {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None
    run = read_card(checkpoint.parent)
    options = manifest.get("plugins") or {}
    return write_model_card(
        out,
        base_model=manifest["model"].get("base"),
        fingerprint=(manifest.get("base_fingerprint") or {}).get("id"),
        plugins=list(options),
        options={name: opts for name, opts in options.items() if opts},
        data=run.get("data"),
        metrics=metrics,
        training_command=run.get("command") or manifest.get("command"),
    )


def _metadata(facts: dict[str, Any]) -> dict[str, Any]:
    from huggingface_hub import ModelCardData

    base = facts.get("base_model")
    hub_base = base if base and _HUB_ID.fullmatch(base) and not os.path.exists(base) else None  # not a local path
    adapter = facts["kind"].endswith("adapter")
    tags = ["perl-plugins", "trl", *(["lora"] if adapter else []), *facts.get("plugins", [])]
    card = ModelCardData(
        base_model=hub_base, library_name="peft" if adapter else "transformers", tags=list(dict.fromkeys(tags))
    )
    meta = card.to_dict()
    meta["perl_plugins"] = facts
    return meta


def _load_snippet(facts: dict[str, Any]) -> str:
    base = facts.get("base_model") or "BASE_MODEL"
    kind = facts["kind"]
    if kind == "adapter":
        return (
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
            "model = PeftModel.from_pretrained(base, PATH_TO_THIS_DIRECTORY)"
        )
    if kind == "reward adapter" and facts.get("head") == "mlp":
        return (
            "# GRM's MLP reward head has no place in a stock classifier: load it with perl-plugins\n"
            "from transformers import AutoModelForCausalLM\nfrom perl_plugins.models.reward import load_reward_adapter\n\n"
            f"model = load_reward_adapter(AutoModelForCausalLM.from_pretrained({base!r}), PATH_TO_THIS_DIRECTORY)"
        )
    if kind == "reward adapter":
        return (
            "from peft import PeftModel\nfrom transformers import AutoModelForSequenceClassification\n\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=1)\n"
            "model = PeftModel.from_pretrained(base, PATH_TO_THIS_DIRECTORY)  # the score head comes with the adapter"
        )
    auto = "AutoModelForSequenceClassification" if kind == "reward model" else "AutoModelForCausalLM"
    return f"from transformers import {auto}\n\nmodel = {auto}.from_pretrained(PATH_TO_THIS_DIRECTORY)"


def render(facts: dict[str, Any]) -> str:
    """The card's text: YAML metadata, then the sections a reader looks for."""
    meta = yaml.safe_dump(_metadata(facts), sort_keys=False, allow_unicode=True)
    base = facts.get("base_model") or "(unknown)"
    lines = [
        "---",
        meta.rstrip(),
        "---",
        "",
        f"# {facts['kind'].capitalize()} trained with perl-plugins",
        "",
        f"- **Base model:** `{base}`",
        f"- **Base fingerprint:** `{facts.get('fingerprint', NO_FINGERPRINT)}` (perl-plugins `base_fingerprint`)",
    ]
    if facts.get("head"):
        lines.append(f"- **Reward head:** `{facts['head']}`")
    plugins = facts.get("plugins")
    lines.append(f"- **Plugins:** {', '.join(f'`{p}`' for p in plugins) if plugins else 'none'}")
    for name, opts in (facts.get("options") or {}).items():
        lines.append(f"  - `{name}`: " + ", ".join(f"`{k}={v!r}`" for k, v in opts.items()))
    data = facts.get("data")
    lines += ["", "## Training data", ""]
    if data:
        lines.append(f"Trained on {data['source']}.")
        if data.get("ours"):
            lines += ["", TASKMASTER_ATTRIBUTION]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Held-out metrics", ""]
    metrics = facts.get("metrics")
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {v if not isinstance(v, float) else f'{v:.4g}'} |" for k, v in metrics.items()]
    else:
        lines.append("None recorded (no held-out data in this run).")
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        *([f"# trained with\n{facts['training_command']}", "# exported with"] if facts.get("training_command") else []),
        facts["command"],
        "```",
        "",
        "## Load",
        "",
        "```python",
        _load_snippet(facts),
        "```",
        "",
    ]
    return "\n".join(lines)
