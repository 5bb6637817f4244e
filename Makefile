# Set-up and everyday targets. `make run` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 3000
TORCH_PIN := torch==2.13.0

.PHONY: setup setup-dev run test test-all bench lint format train-bundled readme-example clean-venv

# Runtime only (no torch): what the service needs.
$(VENV)/.setup-service: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# Training and tests: torch is pinned and installed first so that nothing resolves a CUDA build.
$(VENV)/.setup-dev: pyproject.toml $(VENV)/.setup-service
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[train,dev]"
	touch $@

setup: $(VENV)/.setup-service
setup-dev: $(VENV)/.setup-dev

run: setup
	FUSC_MODEL_REPOSITORY=$${FUSC_MODEL_REPOSITORY:-model_repository} \
	  $(VENV)/bin/bentoml serve service.api:FuscService --host $(HOST) --port $(PORT)

test: setup-dev
	$(PY) -m pytest -m "not slow" -q

test-all: setup-dev
	$(PY) -m pytest -q

bench: setup-dev
	$(PY) -m benchmarks.run

lint: setup-dev
	$(VENV)/bin/ruff check service training tests benchmarks
	$(VENV)/bin/ruff format --check service training tests benchmarks

format: setup-dev
	$(VENV)/bin/ruff format service training tests
	$(VENV)/bin/ruff check --fix service training tests

# Rebuilds the bundled demonstration model in model_repository/ (about 20 minutes on 2 CPU cores). The
# phantom cervix view is left out of training on purpose: it is the unseen view the OOD check must flag.
BUNDLED_PHANTOM_VIEWS := brain abdomen femur thorax_4ch spine profile kidneys
train-bundled: setup-dev
	$(PY) -m training train --preset cpu-small \
	  --data csv:../shared/data/hc18 --data csv:../shared/data/fetal_planes_db \
	  --phantoms 1500 --phantom-views $(BUNDLED_PHANTOM_VIEWS) --clusters 10 --test-fraction 0.2 \
	  --name-clusters-from-labels --version 0.2.0 --out model_repository --run-dir runs/bundled

# Rewrites the README's example answer from the real service on the bundled model (needs ../shared/data).
readme-example: setup
	$(PY) -m service.examples readme

clean-venv:
	rm -rf $(VENV)
