# streamer — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench soak chaos rules clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned to the CPU wheel first, so nothing pulls a CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[embedded,plots,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/streamer demo

test: $(STAMP)
	bash .ci/system-deps
	$(BIN)/ruff check streamer tests
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check streamer tests
	$(BIN)/ruff format --check streamer tests

bench: $(STAMP)
	$(BIN)/streamer bench

# RSS and lag while a backlog of 1,000,000 records drains (bench/soak.json, bench/soak.png)
soak: $(STAMP)
	$(BIN)/streamer soak

# Faults under load, every record checked: 50 kills, a 2-minute rebalance storm, 5 network
# rounds (bench/chaos.json); the short form runs inside `make test`
chaos: $(STAMP)
	$(BIN)/streamer chaos

# Alert rules: write the PrometheusRule from monitoring/prometheus/streamer-rules.yaml, then check
# and unit-test the rules with promtool (Debian package `prometheus`; .ci/system-deps installs it)
rules: $(STAMP)
	$(BIN)/python monitoring/sync_rules.py
	cd monitoring/prometheus && promtool check rules streamer-rules.yaml && promtool test rules streamer-rules.test.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
