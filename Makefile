# Two entry points: `make demo` (install + run the main job offline on a built-in demo)
# and `make test` (install + browser + lint + the whole test suite). .ci/run calls `make test`.
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

# The browser tests need Debian's Chromium: installed here, visibly, never from inside a test.
browser:
	@command -v chromium >/dev/null || (echo "installing Debian's chromium for the browser tests" && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

lint: install
	$(BIN)/ruff check src tests bench

test: install browser lint
	$(BIN)/python -m pytest

test-fast: install lint
	$(BIN)/python -m pytest -m "not slow"

# `make image`: the serving container (torch-free base install). Without a registry, build a local base first:
#   scripts/debian-base-image.sh && make image BASE=localhost/bookworm-python:3.11 CONTAINER="podman --runtime runc"
# IMAGE_FLAGS passes anything else to the build (e.g. a proxy's CA bundle: see the Dockerfile).
IMAGE ?= tlearn-serve
BASE ?= python:3.11-slim
CONTAINER ?= $(shell command -v docker || command -v podman)
IMAGE_FLAGS ?=
image:
	$(CONTAINER) build $(if $(findstring podman,$(CONTAINER)),--format docker) --build-arg BASE=$(BASE) \
		$(IMAGE_FLAGS) -t $(IMAGE) .

.PHONY: install demo browser lint test test-fast image
