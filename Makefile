# FlexServe: `make run` starts the server, `make test` runs the suite.
# Each creates or reuses .venv and installs what it needs first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: run test install install-test lint clean

run: $(VENV)/.installed
	$(BIN)/flexserve serve $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "FlexServe needs Python 3.11 or newer"'
	@$(PYTHON) -m venv $(VENV) || { echo "Could not create a virtualenv: on Debian/Ubuntu run 'apt-get install python3-venv' first." >&2; exit 1; }
	$(PIP) install --quiet --upgrade pip

# llama-cpp-python compiles llama.cpp on first install (several minutes on two
# cores); pip keeps the built wheel in its cache, so later installs are quick.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --progress-bar off -e '.[embedded]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) install --progress-bar off -e '.[embedded,test]'
	@touch $(VENV)/.installed $@

lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
