# The two commands a newcomer needs: `make run` and `make test`.
# Each installs what it needs into .venv first (only Python 3.11+ is assumed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The inbox's browser test drives Debian's chromium through playwright; playwright's
# own browser download is never used.
CHROMIUM := /usr/bin/chromium

.PHONY: setup run test bench lint clean

# The project's own bytecode is compiled here (a no-op when current): where
# PYTHONDONTWRITEBYTECODE is set, every `opsflow` command would otherwise compile
# its modules afresh, ~0.3 s per command (measured on `opsflow status`).
setup: $(STAMP) $(CHROMIUM)
	@$(BIN)/python -m compileall -q shared services >/dev/null

$(STAMP): pyproject.toml services/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "opsflow needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e ./services
	@touch $(STAMP)

# Nothing to do once it is there. Without apt-get (or root) setup goes on and says so:
# the browser test then fails naming what is missing.
$(CHROMIUM):
	@if command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y --no-install-recommends chromium \
		|| { apt-get update && apt-get install -y --no-install-recommends chromium; } \
		|| echo "could not install chromium: tests/test_review_inbox.py will fail" >&2; \
	else \
		echo "no apt-get: install chromium as $(CHROMIUM) for tests/test_review_inbox.py" >&2; \
	fi

run: setup
	$(BIN)/opsflow up

# Two workers, each with a session stack of its own; a module's tests stay on one
# worker, so a module's own stack or browser starts once (README: The test suite).
test: setup
	$(BIN)/pytest --numprocesses 2 --dist loadfile

bench: setup
	$(BIN)/python -m tests.bench

lint: setup
	$(BIN)/ruff check shared services tests
	$(BIN)/ruff format --check shared services tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .opsflow .pytest_cache .mypy_cache .ruff_cache
