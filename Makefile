# make help: what each target does.
PY := .venv/bin/python
# torch is pinned so pip takes the CPU wheel on CPU machines and never swaps it for a newer (CUDA) build.
TORCH := torch==2.13.0

.PHONY: help setup train test test-slow test-docs test-all bench lint
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

setup: .venv/.installed  ## create .venv and install the project with its calibration tools (CPU torch)

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	echo "$(TORCH)" > .venv/constraints.txt
	$(PY) -m pip install --quiet -e '.[calibrate,test]' --constraint .venv/constraints.txt
	touch $@

train: setup  ## quantize the reference digits DiT to 3 bits
	$(PY) train.py quant=w3

test: setup  ## ruff, then the default test suite (764 tests: 6.1-11 min on 2 idle cores, by machine), slowest listed
	$(PY) -m ruff check .
	$(PY) -m pytest --durations=15

test-slow: setup  ## the tests marked slow (67: 21.2 min idle; killed and resumed runs, whole CLI runs; CI runs them)
	$(PY) -m pytest -m slow --durations=10

test-docs: setup  ## every command of the README and docs/, run as typed at test size (CI runs these too)
	$(PY) -m pytest -m docs --durations=10

test-all: setup  ## every test, the slow ones and the documented commands too
	$(PY) -m pytest -m ""

bench: setup  ## the README's comparison table and figure, from the row records today's code made (docs/comparison.md)
	$(PY) benchmarks/compare.py --seeds 0,1 --from-cache

lint: setup  ## ruff, with the project's line length (pyproject.toml)
	$(PY) -m ruff check .
