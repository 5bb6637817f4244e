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
	$(PIP) install -q -e ".[train,dev,ray,archive]"
	touch $@

setup: $(VENV)/.setup-service
setup-dev: $(VENV)/.setup-dev

run: setup
	FUSC_MODEL_REPOSITORY=$${FUSC_MODEL_REPOSITORY:-model_repository} \
	  $(VENV)/bin/bentoml serve service.api:FuscService --host $(HOST) --port $(PORT)

test: setup-dev
	$(PY) -m pytest -m "not slow" -q

test-all: setup-dev labelstudio-venv
	$(PY) -m pytest -q

# The suites marked slow (Label Studio, a Ray cluster, the 200-instance PACS runs, training, memory), all
# but the load run (about 9 minutes on its own: `make test-load`). CI runs this after `make test`.
.PHONY: test-slow test-load
test-slow: setup-dev labelstudio-venv
	$(PY) -m pytest -q -m slow --deselect tests/integration/test_load.py

test-load: setup-dev
	$(PY) -m pytest -q -m slow tests/integration/test_load.py

# Every ratio in one run (about 5 minutes on 2 cores): benchmarks/results/bench.json and docs/benchmarks.md.
bench: setup-dev
	$(PY) -m benchmarks.run

# Capacity, 80 % of it and five minutes at twice it (about 9 minutes): benchmarks/results/load.json.
# Peak memory under 32 concurrent 49 MB uploads: benchmarks/results/memory.json.
.PHONY: bench-load bench-memory
bench-load: setup-dev
	$(PY) -m benchmarks.load --repository bundled

bench-memory: setup-dev
	$(PY) -m benchmarks.memory

# The int8 backbone beside the fp32 one (model_repository/fusc_backbone_int8, listed in the card): static
# QDQ, calibrated on real + phantom images through the service's decode + clean (phantoms only without
# ../shared/data). About a minute on 2 cores. Run it again after `make train-bundled`.
.PHONY: quantize
quantize: setup-dev
	$(PY) -m service.quantize --repository model_repository --data ../shared/data

lint: setup-dev
	$(VENV)/bin/ruff check service training tests benchmarks
	$(VENV)/bin/ruff format --check service training tests benchmarks

format: setup-dev
	$(VENV)/bin/ruff format service training tests
	$(VENV)/bin/ruff check --fix service training tests

# Rebuilds the bundled demonstration model in model_repository/, its int8 backbone included (about 8 minutes
# on 2 CPU cores). K = 12:
# more clusters than the 7 phantom views, so that real frames (another domain) get clusters of their own. The
# phantom cervix view is left out of training on purpose: it is the unseen view the OOD check must flag.
BUNDLED_PHANTOM_VIEWS := brain abdomen femur thorax_4ch spine profile kidneys
train-bundled: setup-dev
	$(PY) -m training train --preset cpu-small \
	  --data csv:../shared/data/hc18 --data csv:../shared/data/fetal_planes_db \
	  --phantoms 1500 --phantom-views $(BUNDLED_PHANTOM_VIEWS) --clusters 12 --test-fraction 0.2 \
	  --name-clusters-from-labels --version 0.2.0 --out model_repository --run-dir runs/bundled
	$(PY) -m service.quantize --repository model_repository --data ../shared/data

# Rewrites the README's example answer from the real service on the bundled model (needs ../shared/data).
readme-example: setup
	$(PY) -m service.examples readme

clean-venv:
	rm -rf $(VENV)

# ---------------------------------------------------------------------------------------------- Triton
# The CPU tritonserver from PyPI (nvidia-pytriton bundles it, Python backend only) lives in its own venv,
# because nvidia-pytriton pins numpy<2. About half a minute from PyPI; setup-dev (so `make test`) makes it,
# as tests/integration/test_triton.py starts that server. docs/triton.md has the NGC (GPU) side.
TRITON_VENV ?= .venv-triton
TRITON_VARIANT ?= ngc
TRITON_MAX_BATCH_SIZE ?= 64
TRITON_HTTP_PORT ?= 8000
TRITON_GRPC_PORT ?= 8001

.PHONY: triton-venv triton-repo triton-serve test-triton

$(TRITON_VENV)/.setup: service/triton/requirements-server.txt service/triton/requirements-preprocess.txt
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q -r service/triton/requirements-server.txt
	touch $@

triton-venv: $(TRITON_VENV)/.setup
setup-dev: triton-venv

# build/triton-ngc: the repository the NGC image serves (TRITON_VARIANT=cpu for the PyPI server's).
triton-repo: setup
	$(PY) -m service.triton repo --from model_repository --out build/triton-$(TRITON_VARIANT) \
	  --variant $(TRITON_VARIANT) --max-batch-size $(TRITON_MAX_BATCH_SIZE) --force

# The CPU server on 127.0.0.1 for development; then `FUSC_BACKEND=triton make run` in another shell.
triton-serve: setup triton-venv
	$(PY) -m service.triton repo --from model_repository --out build/triton-cpu --variant cpu \
	  --max-batch-size $(TRITON_MAX_BATCH_SIZE) --force
	$(PY) -m service.triton serve --repository build/triton-cpu --venv $(TRITON_VENV) \
	  --http-port $(TRITON_HTTP_PORT) --grpc-port $(TRITON_GRPC_PORT)

test-triton: setup-dev
	$(PY) -m pytest -q tests/service/test_triton_backend.py tests/service/test_triton_repository.py \
	  tests/integration/test_triton.py

# ------------------------------------------------------------------------------------------ Review app
# Label Studio (the review's hand-off to labelers) in its own venv: it brings Django and its own pins.
# About 90 s and 1 GB from PyPI; tests/review/test_labelstudio.py (slow) starts it on 127.0.0.1 and skips
# without it.
LABELSTUDIO_VENV ?= .venv-labelstudio
RUN ?= runs/archive
REVIEW_PORT ?= 8765

LABELSTUDIO_DATA ?= runs/labelstudio
LABELSTUDIO_PORT ?= 8080

.PHONY: labelstudio-venv labelstudio review test-review test-labelstudio

$(LABELSTUDIO_VENV)/.setup: service/review/requirements-labelstudio.txt
	$(PYTHON) -m venv $(LABELSTUDIO_VENV)
	$(LABELSTUDIO_VENV)/bin/python -m pip install -q --upgrade pip
	$(LABELSTUDIO_VENV)/bin/python -m pip install -q -r service/review/requirements-labelstudio.txt
	touch $@

labelstudio-venv: $(LABELSTUDIO_VENV)/.setup

# Label Studio on 127.0.0.1:$(LABELSTUDIO_PORT) for the review, until Ctrl-C; it prints how to point the
# review app at it (credentials made once in $(LABELSTUDIO_DATA)/fusc-credentials.json).
labelstudio: setup labelstudio-venv
	$(PY) -m service.review.labelstudio --venv $(LABELSTUDIO_VENV) --data-dir $(LABELSTUDIO_DATA) \
	  --port $(LABELSTUDIO_PORT)

# The review web app over a finished archive run: make review RUN=runs/archive
review: setup
	$(PY) -m service.review $(RUN) --host $(HOST) --port $(REVIEW_PORT)

test-review: setup-dev
	$(PY) -m pytest -q tests/review -m "not slow"

test-labelstudio: setup-dev labelstudio-venv
	$(PY) -m pytest -q tests/review/test_labelstudio.py

# ------------------------------------------------------------------------------------------------ PACS
# The PACS worker: C-STORE receiver, DICOMweb watcher, write-back (settings FUSC_PACS_*, docs/pacs.md).
.PHONY: pacs
pacs: setup
	$(PY) -m service.pacs run

# ---------------------------------------------------------------------------------------------- Archive
# The archive's Ray engine against a real local cluster (head + worker on loopback, about 50 s).
.PHONY: test-ray
test-ray: setup-dev
	$(PY) -m pytest -q -m slow tests/archive/test_ray.py
