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

# Chromium renders the HTML report in tests/test_report.py. Installed here, in view, as a step of `make test`
# (Debian's package, about 130 packages, needs root); no test ever installs anything.
browser:
	@command -v chromium >/dev/null || { echo "make browser: installing Chromium (apt-get install chromium)"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test: install browser
	$(BIN)/python -m pytest

.PHONY: install demo test browser
