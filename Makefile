# The two commands of the quick start: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.neox-l2e-installed
PYTEST_ARGS ?=

.PHONY: demo test lint format install docs clean-demo

$(STAMP): setup.py requirements.txt tools/install.sh $(wildcard kernels/csrc/*.cpp)
	bash tools/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP)
	$(PY) -m neox_l2e.config.docs > docs/config.md

clean-demo:
	rm -rf runs/demo
