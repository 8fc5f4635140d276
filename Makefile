# Two-command quick start: `make demo` and `make test` each build .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmcore-installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export DS_BUILD_OPS := 0

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU torch first: anything that depends on torch must find it already satisfied.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,test]'
	touch $(STAMP)

# pytest exits 5 when nothing was collected; that is a failure here too (make stops on any non-zero).
# ruff (format check, lint + import order) and mypy (the modules in [tool.mypy] files) run first: an error
# stops the run. pytest runs on two workers (pytest-xdist), each test file whole on one of them (module
# fixtures built once), one intra-op thread each (tests/conftest.py): 9.1 min instead of 16 on 2 cores.
test: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(PY) -m llmcore demo --out demo_out

clean:
	rm -rf $(VENV) .cache demo_out
