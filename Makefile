# `make test` and `make demo` set themselves up: each creates .venv (CPU build of torch)
# when it is missing, then runs. GPU users install requirements.txt into their own env.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-cpu

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-cpu.txt tools/fix_cpu_torchvision.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-cpu.txt
	$(BIN)/python tools/fix_cpu_torchvision.py
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python demo.py

clean:
	rm -rf $(VENV) output
