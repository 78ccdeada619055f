# `make test` and `make demo` set themselves up: each creates .venv (CPU build of torch, the
# exact versions of requirements-lock.txt) when it is missing, then runs. GPU users install
# requirements.txt (ranges) into their own env. `make test-latest` checks the newest releases
# the ranges allow in a separate .venv-latest, before the lock is moved.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-cpu
LATEST := .venv-latest
LATEST_BIN := $(LATEST)/bin

# pip's output cut to one line per package it fetches, then its summary (pipefail keeps its exit status)
PIP_SUMMARY := awk '/^Collecting /{print "  " $$2; fflush()} /^(Successfully installed|ERROR)/{print; fflush()}'

.PHONY: test test-fast lint test-latest demo venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-cpu.txt requirements-lock.txt tools/fix_cpu_torchvision.py
	@echo "Setting up $(VENV): the locked CPU set of requirements-lock.txt (torch 2.13.0 CPU, transformers, timm, ...)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements-lock.txt --upgrade pip
	@echo "Installing (each package as pip fetches it; a few minutes on a fresh machine):"
	$(BIN)/pip install --progress-bar off -r requirements-cpu.txt -c requirements-lock.txt | $(PIP_SUMMARY)
	$(BIN)/python tools/fix_cpu_torchvision.py
	touch $(STAMP)

# pytest-xdist processes (each module runs whole in one; the toy runs several modules read are
# made once, see tests/conftest.py): the CI machine has two cores
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The edit cycle: everything but the tests marked slow (toy training runs, whole scripts).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# Unused and undefined names, import order (settings in pyproject.toml); CI runs it first.
lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/python demo.py

# A fresh environment every time, so it really holds today's newest releases.
test-latest:
	@echo "Setting up $(LATEST): the newest releases requirements-cpu.txt allows (no lock)"
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST_BIN)/pip install --quiet --upgrade pip
	$(LATEST_BIN)/pip install --progress-bar off --upgrade -r requirements-cpu.txt | $(PIP_SUMMARY)
	$(LATEST_BIN)/python tools/fix_cpu_torchvision.py
	$(LATEST_BIN)/pip freeze --all | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > $(LATEST)/versions.txt
	@echo "Versions under test (also in $(LATEST)/versions.txt):"
	@grep -iE '^(torch|torchvision|transformers|timm|tokenizers|numpy|pillow)==' $(LATEST)/versions.txt
	$(LATEST_BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) $(LATEST) output
