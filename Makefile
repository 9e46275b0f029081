# make help: what each target does.
PY := .venv/bin/python
# torch is pinned so pip takes the CPU wheel on CPU machines and never swaps it for a newer (CUDA) build.
TORCH := torch==2.13.0

.PHONY: help setup train test test-all bench
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

setup: .venv/.installed  ## create .venv and install the project (CPU torch, no torchvision)

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	echo "$(TORCH)" > .venv/constraints.txt
	$(PY) -m pip install --quiet -e '.[test]' --constraint .venv/constraints.txt
	touch $@

train: setup  ## quantize the reference digits DiT to 3 bits
	$(PY) train.py quant=w3

test: setup  ## the default test suite (about 5.5 minutes on 2 cores)
	$(PY) -m pytest

test-all: setup  ## every test, the slow ones too
	$(PY) -m pytest -m ""

bench: setup  ## the README's results table (benchmarks/results/digits)
	$(PY) benchmarks/vq4dit_digits.py
