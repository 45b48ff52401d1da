# The two commands of README.md. Everything else is reached through the `spotex` CLI.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test install install-dev lint typecheck pytest native clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install only when the project's metadata changed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## make run: install, start the exchange on embedded services and open the cockpit on top.
run: install
	$(BIN)/spotex run

## make test: install with dev extras; ruff, mypy (strict on core/), then the whole pytest suite.
test: install-dev lint typecheck pytest

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy core spotex ledger edge jobs cockpit benchmarks runbooks

pytest:
	$(BIN)/pytest -q

## make safety-case: bundle the newest evidence under build/ into build/safety-case/ (manifest.json, a tarball
## named by commit, its .sha256) and gate on the required evidence (docs/verification.md); extra flags in
## SAFETY_CASE_ARGS, e.g. make safety-case SAFETY_CASE_ARGS="--max-age-hours 24 --skip load_regression".
.PHONY: safety-case
safety-case: install
	$(BIN)/spotex safety-case $(SAFETY_CASE_ARGS)

## make native (optional, needs a C compiler): compile the engine with mypyc, verify it against the
## pure-Python reference and stamp it; SPOTEX_ENGINE=native then selects it (docs/engine.md).
native: install-dev
	$(BIN)/spotex core build-native

clean:
	rm -rf $(VENV) build .spotex
