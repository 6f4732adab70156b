# The two commands a new user runs: `make demo` and `make test`. Each sets up
# what it needs first: a virtual environment in .venv, installed from the pins
# in constraints.txt (torch first and pinned: an unpinned torch pulls a large
# CUDA build where a CPU one is wanted).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready

.PHONY: setup demo test test-thorough test-all chaos bench clean

ROUNDS ?= 200

setup: $(READY)

$(READY): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt torch
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(READY)

demo: setup
	$(BIN)/traind demo demo

# First the import rule (lint-imports: pyproject.toml's contracts, docs/architecture.md). Then three processes,
# a test file each at a time (pytest-xdist): on two cores, since most tests spend much of their
# time waiting on a daemon or a worker subprocess (9.6 minutes against 12 with two); then the UI in tmux on a
# real daemon, alone, since its screen is read against the clock. It ends with the ten slowest tests
# (docs/testing.md).
# A test starts hundreds of pythons (daemons, commands, fake workers): each reuses engine/'s compiled bytecode
# rather than compiling it again, even where the environment says not to write it.
test test-thorough: export PYTHONDONTWRITEBYTECODE =
test: setup
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest -n 3 --dist loadfile --no-loadscope-reorder --ignore=tests/test_tui_tmux.py --durations=10
	$(BIN)/python -m pytest tests/test_tui_tmux.py

# The thorough suite every landing runs after make test (.ci/run; docs/testing.md): the longer variants of its
# cases, every property test at full size, 20 rounds of kill -9, and every write of a whole job failing in turn
# in four modes.
test-thorough: setup
	$(BIN)/python -m pytest -q -m long --durations=5
	TRAIND_THOROUGH=1 $(BIN)/python -m pytest -q -m fuzz
	$(BIN)/python tests/chaos.py --rounds 20
	TRAIND_FAULT_SWEEP=all $(BIN)/python -m pytest -q tests/test_write_faults.py

test-all: test test-thorough

# The standing reliability suite (docs/reliability.md): ROUNDS rounds of kill -9, the daemon's state machine at
# full size (many long sequences of every action and fault), then every write of a
# whole job failing in turn (ENOSPC and EIO, once and persistently), then the longer variants of cases
# make test covers (`-m long`: the two-process ones). Not part of `make test`.
chaos: setup
	$(BIN)/python tests/chaos.py --rounds $(ROUNDS)
	TRAIND_THOROUGH=1 $(BIN)/python -m pytest -q tests/test_supervisor_machine.py
	TRAIND_FAULT_SWEEP=all $(BIN)/python -m pytest -q -s tests/test_write_faults.py
	$(BIN)/python -m pytest -q -m long

bench: setup
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev,bench]'
	$(BIN)/python bench/supervisor_overhead.py
	$(BIN)/python bench/supervisor_overhead.py --packing
	$(BIN)/python bench/validation.py
	$(BIN)/python bench/worker_start.py
	$(BIN)/python bench/intake_latency.py
	$(BIN)/python bench/nan_guard.py
	$(BIN)/python bench/pause_latency.py
	$(BIN)/python bench/snapshot.py
	$(BIN)/python bench/verify.py
	$(BIN)/python bench/adapters.py
	$(BIN)/python bench/continual.py
	$(BIN)/python bench/tokenization.py
	$(BIN)/python bench/packing.py

clean:
	rm -rf $(VENV) demo .pytest_cache
