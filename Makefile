# Every target creates and uses .venv by itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# OpenMP threads that spin while waiting make torch many times slower on a busy machine
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install run test bench lint docs clean image lock

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first: a plain requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[pipeline,demo,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fcpts run --tolerance 0.1

test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/run.py
	$(PY) bench/speed.py
	$(PY) bench/peers/run_peers.py --results bench/RESULTS.md

docs: $(STAMP)
	$(PY) -m fcpts.cli.docs README.md
	$(PY) -m components.build
	$(PY) tests/bad_inputs.py --write docs/bad-inputs.md

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench components pipelines
	$(VENV)/bin/ruff format --check src tests bench components pipelines

# The container image the KFP steps run in: `make image` (VARIANT=cuda for --gpu, PUSH=1 to
# push), with docker or podman. IMAGE defaults to $$FCPTS_IMAGE, else components.IMAGE; the
# CUDA variant is tagged $$FCPTS_CUDA_IMAGE, else IMAGE-cuda (what --gpu compiles to).
IMAGE ?= $(or $(FCPTS_IMAGE),$(shell sed -n 's/^IMAGE = "\(.*\)"$$/\1/p' components/__init__.py))
VARIANT ?= cpu
IMAGE_TAG = $(if $(filter cuda,$(VARIANT)),$(or $(FCPTS_CUDA_IMAGE),$(IMAGE)-cuda),$(IMAGE))

image:
	sh components/image.sh '$(IMAGE_TAG)' '$(VARIANT)' '$(PUSH)'

# The image's pinned requirements, from the packages installed in .venv
lock: $(STAMP)
	$(PY) -m components.lock

clean:
	rm -rf $(VENV) .pytest_cache
