"""Model aliases (``--model_name_or_path ALIAS`` in the CLI and recipes, ``resolve_model(ALIAS)``);
``perl-plugins models`` lists them.

An alias wins over a local directory of the same name: write ``./smollm2-135m-instruct`` for that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from perl_plugins.models import smollm2


@dataclass(frozen=True)
class Alias:
    name: str
    source: str  # where the weights come from
    license: str
    resolve: Callable[[], str]  # -> a directory ``from_pretrained`` loads
    status: Callable[[], str]  # is it usable here, without writing anything


def _embedded(size: str) -> Callable[[], str]:
    def resolve() -> str:
        from perl_plugins.models.embedded import resolve_model

        return resolve_model(None, size)

    return resolve


def _embedded_status() -> str:
    from perl_plugins.models.embedded import default_model_source

    source = default_model_source("demo")
    return f"shipped: {source}" if source else "assets absent: random init (size demo)"


def _smollm2_status() -> str:
    try:
        path = smollm2.gguf_path()
    except smollm2.ModelUnavailableError:
        return f"not installed: {smollm2.INSTALL_LINE}"
    return f"installed: {path} (materialised once into the cache at first use)"


ALIASES: dict[str, Alias] = {
    alias.name: alias
    for alias in (
        Alias(
            "embedded",
            "the pre-trained ~5M-parameter Llama shipped in perl_plugins/assets/base (trained on the "
            "Taskmaster coffee text by recipes/pretrain_base.py, tokenizer trained here; see its CARD.md). "
            "Same as no model, perl-plugins/embedded-default, or --model_size demo.",
            "weights: this project's; data: Taskmaster Coffee, CC BY 4.0",
            _embedded("demo"),
            _embedded_status,
        ),
        Alias(
            "tiny",
            "a ~0.3M-parameter Llama with random weights and the embedded tokenizer (for fast tests); "
            "same as --model_size tiny with no model.",
            "this project's",
            _embedded("tiny"),
            lambda: "built at first use (random init, seed 0)",
        ),
        Alias(
            smollm2.ALIAS,
            f"{smollm2.SOURCE} (134.5M parameters, chat template), from the PyPI package "
            f"{smollm2.DISTRIBUTION}'s {smollm2.GGUF_FILE}, de-quantized to float32.",
            "Apache-2.0",
            lambda: str(smollm2.materialize()),
            _smollm2_status,
        ),
    )
}


def resolve_alias(name: str) -> str | None:
    """The directory an alias stands for (materialised on first use), or None if ``name`` is none."""
    alias = ALIASES.get(name)
    return alias.resolve() if alias is not None else None


def describe_models() -> dict[str, Any]:
    """Every alias with its source, license and status here."""
    return {
        "models": [
            {"name": a.name, "source": a.source, "license": a.license, "status": a.status()} for a in ALIASES.values()
        ]
    }
