# `make test` sets itself up on a fresh machine: a Python 3.12 virtual
# environment in .venv, the pinned requirements, the package in editable mode.
SHELL := /bin/bash
VENV ?= .venv
# python3.12 from PATH, or pyenv's 3.12 when its shim is not the active one.
PYTHON312 ?= $(shell for p in python3.12 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12; do \
  $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
PY := $(VENV)/bin/python

.PHONY: test test-fast lint format setup setup-gpu setup-tpu setup-slurm setup-export aot clean data sweep compiler check-bare

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found; install it (pyenv install 3.12) or pass PYTHON312=/path/to/python3.12" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

# The same venv with JAX's CUDA 12 plugin or libtpu added (same versions),
# submitit for `mnv2_flax.sweep --submit=slurm`, or the LiteRT interpreter
# that checks `mnv2_flax.export`'s files.
setup-gpu: $(VENV)/.installed-gpu
setup-tpu: $(VENV)/.installed-tpu
setup-slurm: $(VENV)/.installed-slurm
setup-export: $(VENV)/.installed-export

$(VENV)/.installed-gpu $(VENV)/.installed-tpu $(VENV)/.installed-slurm $(VENV)/.installed-export: $(VENV)/.installed-%: $(VENV)/.installed requirements-%.txt
	$(PY) -m pip install --quiet -r requirements-$*.txt
	@touch $@

# The optional extras the tests exercise: submitit (the sweep's Slurm path,
# through its local executor) and the LiteRT interpreter (exports).
test: setup-slurm setup-export
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# The tests that start no process and train nothing: while working.
test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

lint: setup
	$(PY) -m ruff check mnv2_flax tests tools configs benchmarks
	$(PY) -m ruff format --check mnv2_flax tests tools configs benchmarks

format: setup
	$(PY) -m ruff format mnv2_flax tests tools configs benchmarks

# Deviceless TPU compile of a config's train step (libtpu, no TPU needed):
# FLOPs, bytes accessed per image, temporaries. AOT_CONFIG/AOT_TOPOLOGY.
AOT_CONFIG ?= configs/default.py
AOT_TOPOLOGY ?= v5e:1x1
aot: setup-tpu
	$(PY) -m mnv2_flax.benchmark --config=$(AOT_CONFIG) --aot_topology=$(AOT_TOPOLOGY)

# The benchmark on what a bare accelerator image holds, at the lowest JAX
# pyproject.toml admits (requirements-bare.txt: JAX 0.11.2, no TensorFlow),
# with no C++ compiler on PATH: on this host, its CPU.
BARE_VENV ?= .venv-bare
check-bare:
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found" >&2; exit 1; }
	@test -x $(BARE_VENV)/bin/python || $(PYTHON312) -m venv $(BARE_VENV)
	$(BARE_VENV)/bin/python -m pip install --quiet -r requirements-bare.txt
	env -u CXX PATH=$(abspath $(BARE_VENV))/bin PYTHONPATH=$(CURDIR) \
	  $(BARE_VENV)/bin/python -m mnv2_flax.benchmark --width_multiplier=0.35 \
	  --resolution=32 --batch_size=16 --num_classes=10 --steps=3 \
	  --compilation_cache_dir=

clean:
	rm -rf $(VENV) $(BARE_VENV) build *.egg-info

# A C++ compiler for the CPU kernels (mnv2_flax/cpu/csrc, built on first use);
# without one the slower pure-JAX layers run and the kernel tests skip.
compiler:
	@if command -v c++ >/dev/null || command -v g++ >/dev/null; then echo "C++ compiler present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq g++; \
	else echo "warning: no C++ compiler and cannot install g++ (no apt or not root)" >&2; fi

# Offline Fashion-MNIST from Debian's package, where apt is there and allowed.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST idx files present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "warning: cannot install dataset-fashion-mnist (no apt or not root); set config.data.manual_dir to the four idx files" >&2; fi

# The main command: set up, get Fashion-MNIST, run the Fashion-MNIST sweep.
# Without Debian's package (no apt, not root) tfds downloads fashion_mnist,
# which needs internet; without it every point fails with a message saying so.
SWEEP ?= fashion_mnist
SWEEP_ROOT ?= sweeps/$(SWEEP)
# Points at once, each on its share of the cores (or one GPU each).
SWEEP_PARALLEL ?= 2
sweep: setup data
	@if [ -d /usr/share/datasets/fashion-mnist ] || [ -f $${TFDS_DATA_DIR:-$$HOME/tensorflow_datasets}/fashion_mnist/3.0.1/dataset_info.json ]; \
	then download=False; \
	else download=True; echo "Debian's Fashion-MNIST is not here: tfds will download fashion_mnist (needs internet)."; fi; \
	$(PY) -m mnv2_flax.sweep --config='configs/ablation.py:$(SWEEP)' --root='$(SWEEP_ROOT)' \
	  --parallel=$(SWEEP_PARALLEL) --set=data.download=$$download
	@echo "Summary: $(SWEEP_ROOT)/results.md, figure: $(SWEEP_ROOT)/*.png"
