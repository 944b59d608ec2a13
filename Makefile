# walink — `make run` starts the cluster (simulator, gateway, 4 workers) with the dashboard; `make test`
# runs everything but the chaos suite; `make chaos` breaks a running cluster (docs/chaos.md);
# `make bench` measures against the seed architecture;
# `make load` runs a bounded mixed Locust load on a cluster it starts (LOAD_USERS, LOAD_RUN_TIME, …).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# walink's browser: Debian's chromium-headless-shell (half the CPU and memory of full Chromium);
# full Chromium is the seed architecture's browser in `make bench` and selectable with
# CHROMIUM_PATH=/usr/bin/chromium
CHROMIUM_PATH ?= /usr/lib/chromium/chromium-headless-shell
SEED_CHROMIUM_PATH ?= /usr/bin/chromium
export CHROMIUM_PATH SEED_CHROMIUM_PATH

.PHONY: install chromium test chaos lint typecheck unit run bench load clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# the optional extra `load` (Locust), only for `make load`
$(VENV)/.installed-load: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[load]'
	touch $@

install: $(VENV)/.installed chromium

# Debian's chromium and chromium-headless-shell (Playwright cannot download browsers here)
chromium:
	@if [ ! -x "$(CHROMIUM_PATH)" ] || [ ! -x "$(SEED_CHROMIUM_PATH)" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian's chromium and chromium-headless-shell…"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-headless-shell fonts-liberation >/dev/null; \
	  else \
	    echo "Chromium is missing: run  sudo apt-get install -y chromium chromium-headless-shell" \
	      "(or set CHROMIUM_PATH and SEED_CHROMIUM_PATH)"; exit 1; \
	  fi; \
	fi

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/pytest -q tests/test_units.py

test: install lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

# faults injected into a running cluster on a private Redis and Postgres; a table of fault ->
# outcome at the end (docs/chaos.md). Needs root for the tmpfs of the "profile writes failing" fault.
chaos: install
	$(BIN)/pytest -q -p no:cacheprovider tests/chaos

run: install
	$(BIN)/walink run

# the raw figures of each run stay in var/bench/ (e.g. make bench BENCH_ARGS="--quick --only burst50")
BENCH_ARGS ?=
bench: install
	mkdir -p var/bench
	$(BIN)/python -m load_tests.bench --json var/bench/bench-$$(date -u +%Y%m%dT%H%M%SZ).json $(BENCH_ARGS)

# 20 users (3 adding accounts: QR, scan, ready over SSE, logout) for 60 s; exit 1 on any failure
load: install $(VENV)/.installed-load
	$(BIN)/python -m load_tests.load

clean:
	rm -rf var .mypy_cache .ruff_cache .pytest_cache
