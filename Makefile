# The two commands a newcomer needs: `make run` and `make test`.
# Each installs what it needs into .venv first (only Python 3.11+ is assumed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "opsflow needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: setup
	$(BIN)/opsflow up

test: setup
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m tests.bench

lint: setup
	$(BIN)/ruff check shared services tests
	$(BIN)/ruff format --check shared services tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .opsflow .pytest_cache .mypy_cache .ruff_cache
