# Every target installs what it needs into .venv first, so a fresh checkout needs only
# `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/gitcache.toml

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gitcache serve --config $(CONFIG)

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gitcache tests bench
	$(BIN)/ruff format --check gitcache tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.upload
	$(BIN)/python -m bench.mirror
	$(BIN)/python -m bench.s3miss

clean:
	rm -rf $(VENV) .gitcache .pytest_cache .mypy_cache .ruff_cache
