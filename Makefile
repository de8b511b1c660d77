# The two quickstart commands: `make run` (set up + the main job) and `make test` (set up + every check).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

KSERVE ?= .venv-kserve

.PHONY: install run test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# one stamp per extra, remade when pyproject.toml changes
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

# KServe's Python SDK, for the test that calls the server with it, in a venv of its own: its protobuf pin clashes with
# tritonclient.grpc's in one process
$(KSERVE)/.installed:
	$(PYTHON) -m venv $(KSERVE)
	$(KSERVE)/bin/python -m pip install --quiet --upgrade pip
	$(KSERVE)/bin/python -m pip install --quiet "kserve==0.21.0"
	touch $@

# the main job: train -> export (with fp16 and int8 variants) -> gates on `shapes`, failing under 90% accuracy;
# each `make run` replaces the last quickstart run (--force); RUN_ARGS adds flags
run: $(VENV)/.installed
	$(BIN)/modelship run --out runs/quickstart --force --min-accuracy 0.9 --variants fp16,int8 $(RUN_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint $(KSERVE)/.installed
	$(BIN)/pytest
