# The two commands a new user runs: `make demo` and `make test`. Each sets up
# what it needs first: a virtual environment in .venv, installed from the pins
# in constraints.txt (torch first and pinned: an unpinned torch pulls a large
# CUDA build where a CPU one is wanted).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready

.PHONY: setup demo test bench clean

setup: $(READY)

$(READY): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt torch
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(READY)

demo: setup
	$(BIN)/traind demo demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/supervisor_overhead.py
	$(BIN)/python bench/validation.py
	$(BIN)/python bench/intake_latency.py
	$(BIN)/python bench/nan_guard.py
	$(BIN)/python bench/pause_latency.py
	$(BIN)/python bench/snapshot.py
	$(BIN)/python bench/verify.py

clean:
	rm -rf $(VENV) demo .pytest_cache
