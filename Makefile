# Common tasks for the DeepSeek-VL2 Cog model. Everything runs in ./.venv, which the first
# target that needs it creates from scratch (scripts/setup_venv.sh).
PYTHON := .venv/bin/python
# The coglet server spawns its worker as `python` from PATH: put the venv's bin first.
PY_BIN := $(CURDIR)/.venv/bin
PORT ?= 5000
HOST ?= 127.0.0.1
# Requests the local server accepts at once (cog.yaml concurrency.max; coglet reads it from
# COG_MAX_CONCURRENCY when run without Docker).
CONCURRENCY ?= 32
# `make predict`: the weights directory (downloaded into ./weights when absent), the image and
# the prompt. Try it without the real weights: WEIGHTS=tests/data/golden/cases/mla/model
WEIGHTS ?= weights
IMAGE ?= tests/data/golden/inputs/img_640x480.png
PROMPT ?= Find all the <|ref|>red rectangle<|/ref|>
ARGS ?=

.PHONY: help setup predict weights schema schema-check test test-fast test-cog lint format serve bench

help:
	@echo "make setup         create ./.venv with every dependency (torch as requirements.txt pins it)"
	@echo "make predict       answer PROMPT about IMAGE with WEIGHTS (streams the text)"
	@echo "make bench         benchmark (tiny checkpoint on CPU unless BENCH_ARGS says otherwise)"
	@echo "make weights       download deepseek-ai/deepseek-vl2-small into ./weights (resumable)"
	@echo "make schema        regenerate .cog/openapi_schema.json from predict.py"
	@echo "make schema-check  fail if the committed schema is stale"
	@echo "make test          run the test suite (CPU)"
	@echo "make test-fast     the inner loop (<= 60 s): no Cog server, subprocess, fuzz or slow tests"
	@echo "make lint          ruff check + format check + mypy (deepseek_vl2_runtime, predict.py)"
	@echo "make serve         run the Cog HTTP server (coglet) on \$$HOST:\$$PORT without Docker"

setup: .venv/.installed

.venv/.installed: requirements.txt requirements-dev.txt scripts/setup_venv.sh
	scripts/setup_venv.sh

predict: setup
	@if [ "$(WEIGHTS)" = weights ] && [ ! -f weights/config.json ]; then \
		$(PYTHON) -m deepseek_vl2_runtime.hub --dest weights || exit 1; fi
	$(PYTHON) -m deepseek_vl2_runtime generate --weights "$(WEIGHTS)" --image "$(IMAGE)" --prompt "$(PROMPT)" $(ARGS)

BENCH_ARGS ?= --weights tests/data/golden/cases/mla/model --device cpu --threads 1
bench: setup
	$(PYTHON) -m deepseek_vl2_runtime.bench $(BENCH_ARGS)

# The GPU check of issue 11 on a bare device machine (system python3, no .venv: no `setup`);
# writes $$OUT/gpu_check.json + .log. CPU dry run: make gpu-check GPU_CHECK_ARGS=--dry-run
.PHONY: gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

weights: setup
	$(PYTHON) -m deepseek_vl2_runtime.hub --dest weights

schema: setup
	$(PYTHON) scripts/cog_schema.py

schema-check: setup
	$(PYTHON) scripts/cog_schema.py --check

# Every core (pytest-xdist): one module per worker at a time, longest first (tests/conftest.py).
PARALLEL := -n auto --dist loadfile
test: setup
	PATH="$(PY_BIN):$$PATH" $(PYTHON) -m pytest -q $(PARALLEL)

# Markers: pyproject.toml [tool.pytest.ini_options]; tests/conftest.py marks server and soak tests.
FAST := not server and not subprocess and not fuzz and not slow
test-fast: setup
	$(PYTHON) -m pytest -q $(PARALLEL) -m "$(FAST)"

test-cog: setup
	PATH="$(PY_BIN):$$PATH" $(PYTHON) -m pytest -q tests/test_cog_schema.py tests/test_cog_server.py \
		tests/test_predict.py tests/test_hub.py

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy deepseek_vl2_runtime predict.py

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# Weights: ./weights, or DEEPSEEK_VL2_WEIGHTS=/path/to/snapshot make serve
serve: schema-check
	PATH="$(PY_BIN):$$PATH" COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=$(PORT) \
		COG_MAX_CONCURRENCY=$(CONCURRENCY) \
		$(PYTHON) -m cog.server.http --host $(HOST)
