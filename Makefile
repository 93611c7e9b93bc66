# Setup, demo and tests on a fresh machine. CPU setup installs torch 2.13.0 first so that
# pyproject's torch range is already met (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SAMPLE := sample_checkpoints/mlp_mnist1d.safetensors

.PHONY: install demo test lint samples clean

$(STAMP): pyproject.toml plugins/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]' -e './plugins[datasets]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/subspace spectrum $(SAMPLE)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check subspace_cli plugins tests scripts

samples: install
	$(BIN)/python scripts/make_samples.py

clean:
	rm -rf $(VENV) .pytest_cache
