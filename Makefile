# Slicefab — the two commands: `make demo` and `make test`. Both set up everything they
# need on a fresh Debian machine: the Debian packages listed in .ci/apt-packages (only
# those whose command is missing), a .venv with `pip install -e .[dev]`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test test-fast lint typecheck regen bench clean

setup: system-deps $(STAMP)

system-deps:
	@bash .ci/apt-deps

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || bash .ci/apt-deps python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/slicefab demo

lint: setup
	$(BIN)/ruff check abi firmware hostlib rtl/regmap tests

typecheck: setup
	$(BIN)/mypy

# Everything CI runs: lint, strict typing, generated files up to date, every test family.
test: setup lint typecheck
	$(BIN)/python rtl/regmap/generate.py --check
	$(BIN)/pytest $(PYTEST_ARGS)

# The fast suite for a developer's edit loop: no simulators, guests, clusters or slow loops.
test-fast: setup
	$(BIN)/pytest -m "not slow and not rtl and not qemu and not etcd and not netns" $(PYTEST_ARGS)

# Regenerate abi/regmap.py, the C header and docs/abi/registers.md from the SystemRDL map.
regen: setup
	$(BIN)/python rtl/regmap/generate.py

bench: setup
	$(BIN)/slicefab bench alloc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
