# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= runs/demo
export PATCHCORE_THREADS ?= 2
# Passive OpenMP waits: spinning torch/faiss threads stall badly when the cores are shared (measured 10-15x).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-slow docs-check lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on embedded defaults: the demo dataset in a local bucket folder, the patchcore/full-benchmark
# flow on Prefect's ephemeral server, MLflow on SQLite under runs/demo.
demo: $(STAMP)
	$(PY) -m flows.demo --work-dir $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow

# Every command of the real set-up in docs/pipeline.md, servers on loopback (about 4 minutes; CI runs it).
docs-check: $(STAMP)
	$(PY) scripts/docs_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check patchcore_core tasks flows tests bench

bench: $(STAMP)
	$(PY) bench/bench_bottle.py

clean:
	rm -rf runs .pytest_cache
