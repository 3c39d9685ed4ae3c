# Every target installs what it needs into .venv first, so a fresh checkout needs only
# `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What running needs, and on top of it what tests, lint and benchmarks need.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
CONFIG ?= config/gitcache.toml

.PHONY: install run test lint bench clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

install: $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/gitcache serve --config $(CONFIG)

test: $(DEV_STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check gitcache tests bench
	$(BIN)/ruff format --check gitcache tests bench
	$(BIN)/mypy

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.run --shape pack $(BENCH_ARGS)
	$(BIN)/python -m bench.variants
	$(BIN)/python -m bench.variants --shape pack
	$(BIN)/python -m bench.git
	$(BIN)/python -m bench.upload
	$(BIN)/python -m bench.mirror
	$(BIN)/python -m bench.s3miss
	$(BIN)/python -m bench.clone

clean:
	rm -rf $(VENV) .gitcache .pytest_cache .mypy_cache .ruff_cache
