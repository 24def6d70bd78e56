# The two commands of the README:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
# Installed before the project so that the project's torch range installs nothing more.
# Override it for another build, e.g. a CUDA wheel from an index pip is configured for.
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/python -m pip
BIN := $(VENV)/bin

.PHONY: demo test lint setup browser check-deploy clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

# The main job: the whole system on the embedded default (SQLite, local blobs, filesystem
# broker; API and worker processes), a simulated federation through it, the adapter
# exported; then the quick server-step, codec and communication benchmarks.
DEMO_PORT ?= 8000
demo: setup
	$(BIN)/fedsrd demo --data-dir var/demo --port $(DEMO_PORT)
	$(BIN)/python benchmarks/server_step.py --quick
	$(BIN)/python benchmarks/codec.py --quick
	$(BIN)/python benchmarks/comm.py --quick

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The dashboard's browser tests drive Debian's chromium (never a browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The deployment files, without a Docker engine: docker-compose.yml resolves from
# .env.example (dummy secrets) and refuses to without each secret; hadolint passes both
# Dockerfiles. docker-compose (Compose v2) and hadolint are the dev extra's PyPI binaries.
check-deploy: setup
	PATH="$(abspath $(BIN)):$$PATH" bash docker/check-deploy.sh

test: lint browser check-deploy
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
