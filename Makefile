# Common tasks for the DeepSeek-VL2 Cog model. Override PYTHON to use another interpreter.
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
# The coglet server spawns its worker as `python` from PATH: put this interpreter's bin first.
PY_BIN := $(shell $(PYTHON) -c 'import os, sys; print(os.path.dirname(os.path.abspath(sys.executable)))')
PORT ?= 5000
HOST ?= 127.0.0.1

.PHONY: help weights schema schema-check test test-cog lint format serve

help:
	@echo "make weights       download deepseek-ai/deepseek-vl2-small into ./weights (resumable)"
	@echo "make schema        regenerate .cog/openapi_schema.json from predict.py"
	@echo "make schema-check  fail if the committed schema is stale"
	@echo "make test          run the test suite (CPU)"
	@echo "make lint          ruff check + format check"
	@echo "make serve         run the Cog HTTP server (coglet) on \$$HOST:\$$PORT without Docker"

weights:
	$(PYTHON) -m deepseek_vl2_runtime.hub --dest weights

schema:
	$(PYTHON) scripts/cog_schema.py

schema-check:
	$(PYTHON) scripts/cog_schema.py --check

test:
	PATH="$(PY_BIN):$$PATH" $(PYTHON) -m pytest -q

test-cog:
	PATH="$(PY_BIN):$$PATH" $(PYTHON) -m pytest -q tests/test_cog_schema.py tests/test_cog_server.py \
		tests/test_predict.py tests/test_hub.py

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# Weights: ./weights, or DEEPSEEK_VL2_WEIGHTS=/path/to/snapshot make serve
serve: schema-check
	PATH="$(PY_BIN):$$PATH" COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=$(PORT) \
		$(PYTHON) -m cog.server.http --host $(HOST)
