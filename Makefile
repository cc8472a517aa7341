# Slicefab — the two commands: `make demo` and `make test`. Both set up everything they
# need on a fresh Debian machine: the Debian packages listed in .ci/apt-packages (only
# those whose command is missing), a .venv with `pip install -e .[dev]`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The C fast path: pip install compiles it (cffi_modules in setup.py); rebuilt after a C edit.
FASTPATH_SO := cffi_ext/_slicefab.abi3.so
FASTPATH_SRC := $(wildcard cffi_ext/src/*.c cffi_ext/src/*.h cffi_ext/include/*.h) cffi_ext/build.py setup.py
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test test-fast lint typecheck regen bench clean fastpath sanitize crash-test synth waves

setup: system-deps $(STAMP) $(FASTPATH_SO)

system-deps:
	@bash .ci/apt-deps

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || bash .ci/apt-deps python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(FASTPATH_SO): $(FASTPATH_SRC) | $(STAMP)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

fastpath: $(FASTPATH_SO)

# The C sources and their C tests under AddressSanitizer + UndefinedBehaviorSanitizer, then
# the Python differential tests against a sanitized build of the extension (docs/fastpath.md).
sanitize: setup
	$(MAKE) -C cffi_ext -f Makefile.sanitize PYTHON=$(abspath $(BIN)/python)

demo: setup
	$(BIN)/slicefab demo

lint: setup
	$(BIN)/ruff check abi firmware hostlib qemu/slicefab_qemu rtl/regmap rtl/tb cffi_ext tests

typecheck: setup
	$(BIN)/mypy

# Everything CI runs: lint, strict typing, generated files up to date, every test family,
# the C fast path under the sanitizers (~40 s).
test: setup lint typecheck sanitize
	$(BIN)/python rtl/regmap/generate.py --check
	$(BIN)/pytest $(PYTEST_ARGS)

# The fast suite for a developer's edit loop: no simulators, guests, clusters or slow loops.
test-fast: setup
	$(BIN)/pytest -m "not slow and not rtl and not qemu and not etcd and not netns" $(PYTEST_ARGS)

# Regenerate abi/regmap.py, the C header, docs/abi/registers.md and the Verilog register
# block (rtl/regmap/slicefab_xbar_regs.sv) from the SystemRDL map.
regen: setup
	$(BIN)/python rtl/regmap/generate.py

bench: setup
	$(BIN)/slicefab bench alloc

# The crossbar's LUT/FF counts from yosys (docs/rtl.md, "Synthesis"): 6 CPU minutes.
synth: setup
	$(BIN)/slicefab bench synth

# docs/rtl-reconfiguration.svg: a reconfiguration simulated on Verilator, its VCD rendered
# with WaveDrom (docs/rtl.md, "Reconfiguration protocol").
waves: setup
	$(BIN)/python rtl/tb/slicefab_xbar/waves.py

# The crash-consistency test at full length (docs/reliability.md); CI runs 100 points.
CRASH_POINTS ?= 1000
CRASH_SEED ?= 1
crash-test: setup
	SLICEFAB_CRASH_POINTS=$(CRASH_POINTS) SLICEFAB_CRASH_SEED=$(CRASH_SEED) \
		$(BIN)/pytest -q -s tests/test_crash.py -k every_crash_point

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -rf cffi_ext/*.so cffi_ext/_slicefab*.c cffi_ext/*.o cffi_ext/src/*.o cffi_ext/build-sanitize
