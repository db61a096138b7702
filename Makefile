# Two commands on a fresh machine: `make run` and `make test` (both bootstrap .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: run test ui lint format bench clean

# torch first, pinned to the CPU build, so the project's torch range is already satisfied
# and pip never fetches a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/feed-dagster run

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

ui: $(STAMP)
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf data/* .dagster_home/storage .dagster_home/history .dagster_home/logs .dagster_home/schedules
	touch data/.gitkeep
