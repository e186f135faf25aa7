# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_data
DEMO_OUT ?= runs/demo
export PATCHCORE_THREADS ?= 2

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/patchcore demo-data --out $(DEMO_DIR)
	$(VENV)/bin/patchcore evaluate --data $(DEMO_DIR) --category all --out $(DEMO_OUT) --backbone efficientnet_lite0

test: $(STAMP)
	$(VENV)/bin/python -m pytest

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check patchcore_core tasks flows tests bench

bench: $(STAMP)
	$(PY) bench/bench_bottle.py

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
