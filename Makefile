# Two entry points: `make demo` (install + run the main job offline on a built-in demo)
# and `make test` (install + run the whole test suite). .ci/run calls `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/tlearn demo --out demo-output

test: install
	$(BIN)/python -m pytest

.PHONY: install demo test
