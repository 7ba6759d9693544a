# The two set-up commands: `make up` (install, then run the platform with the demo model) and
# `make test` (install, then run the whole test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install up test protos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is pinned in pyproject.toml (the CPU build is on disk on the CI machines).
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'

up: install
	$(BIN)/modelgrid up --demo

test: install
	$(BIN)/python -m pytest -q

protos:
	$(BIN)/python scripts/gen_protos.py

bench: install
	$(BIN)/python bench/bench_model.py

clean:
	rm -rf $(VENV) modelgrid-data .pytest_cache
