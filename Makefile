# Two commands on a fresh machine: `make run` (installs, runs the default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
ARGS ?=

BENCH ?= reverse_fig3
SCALE ?= cpu
JOBS ?= 1

.PHONY: install run reproduce test test-slow lint format clean

install: $(VENV)/.installed

# CPU torch first on a machine without CUDA (a pinned release, so pip does not pull a multi-GB CUDA build
# into an empty venv), then the package with its dev tools, the peers `scripts/bench.py peers` compares
# against (the `bench` extra, installed against the torch already there; the package never imports them) and
# `transformers` for backbone=hf (the `hf` extra) and `rdata` for prepare_data.py austen (`data`), which tests need.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing torch from the default index"; $(PY) -m pip install --quiet torch; \
	else \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev,bench,report,sweep,hf,data]"
	@touch $@

run: install
	$(VENV)/bin/rmt-bench $(ARGS)

# one of the paper's benchmarks (tasks/), cell by cell; re-running skips finished cells and resumes partial ones
reproduce: install
	$(VENV)/bin/rmt-bench-suite $(BENCH) --scale $(SCALE) --jobs $(JOBS)

# the tests in parallel, one process per core (pytest-xdist; at most TEST_WORKERS), one torch thread each
TEST_WORKERS ?= 8
test: install
	$(PY) -m pytest -q -n auto --maxprocesses $(TEST_WORKERS)

test-slow: install
	$(PY) -m pytest -q -m slow -n auto --maxprocesses $(TEST_WORKERS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
