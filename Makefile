# Setup, demo and tests on a fresh machine. CPU setup pins torch 2.13.0 (the CPU wheel on local
# disk) in the same pip call as the project, so pyproject's torch range is met by it (an
# unpinned torch pulls a multi-GB CUDA build); one resolution instead of two.
# The two editable builds use the venv's setuptools (the build requirement of both
# pyproject.toml files, and a dependency of torch anyway) instead of a fresh isolated build
# environment each, which took longer than the builds: a new build requirement has to be added
# to the first pip line too.
# `make test` runs the suite on up to 4 processes (pytest-xdist, in the dev extra; one per CPU
# core); plain `pytest` runs it in one.
# The venv is made without pip and this Python's pip installs pip and setuptools into it
# (`pip --python`, pip >= 22.3): ensurepip would install and byte-compile a pip only to replace
# it (~6 s); where the outer pip is older, ensurepip is the fallback.
# pip byte-compiles every module it installs, one at a time (torch alone has thousands: ~40 s);
# --no-compile skips that, and two processes then import what the tool and its tests use, in
# parallel, writing bytecode only for those modules (PYTHONDONTWRITEBYTECODE, which some
# environments set, is cleared for that step alone). Modules imported later are compiled on
# first use as usual.
WARM_TORCH := torch, torch.func, torch._dynamo, torch.distributed, safetensors.torch, \
	subspace_cli.cli, subspace_cli.spectrum, subspace_cli.projected
WARM_REST := scipy.sparse.linalg, scipy.optimize, scipy.stats, sklearn.datasets, mnist1d, h5py, \
	matplotlib.pyplot, rich.progress, tabulate, sympy, pytest, xdist, hypothesis, transformers
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SAMPLE := sample_checkpoints/mlp_mnist1d.safetensors

.PHONY: install demo test lint samples clean

$(STAMP): pyproject.toml plugins/pyproject.toml Makefile
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install -q --no-compile --upgrade pip 'setuptools>=77' \
		|| { $(BIN)/python -m ensurepip > /dev/null && \
		     $(BIN)/python -m pip install -q --upgrade pip 'setuptools>=77'; }
	$(BIN)/python -m pip install -q --no-compile --no-build-isolation torch==2.13.0 -e '.[dev]' \
		-e './plugins[datasets,hf]'
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -c 'import $(WARM_TORCH)' & \
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -c 'import $(WARM_REST)'; \
	status=$$?; wait $$! && exit $$status
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/subspace spectrum $(SAMPLE)

test: install
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

lint: install
	$(BIN)/ruff check subspace_cli plugins tests scripts

samples: install
	$(BIN)/python scripts/make_samples.py

clean:
	rm -rf $(VENV) .pytest_cache
