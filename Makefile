# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when pyproject.toml changes (the package itself is installed editable).
$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/streamgru demo

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q
	NUMBA_DISABLE_JIT=1 $(BIN)/python -m pytest -q -m nojit -p no:cacheprovider
	$(BIN)/python -m pytest -q benchmarks --benchmark-disable
	$(BIN)/ruff check streamgru converters tests benchmarks

# The inner loop: everything but the tests marked slow (make test runs them all).
test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check streamgru converters tests benchmarks

bench: $(VENV)/.dev-installed
	$(BIN)/python -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
