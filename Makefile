# hotmerge: `make serve` runs the server on the embedded default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is enough for the tests and the embedded default; on a GPU machine
# `make setup TORCH_SPEC=torch` keeps (or installs) a CUDA build instead.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup proto serve test test-gpu bench lint format clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed proto

proto: $(VENV)/.installed
	$(PY) proto/generate.py

serve: setup
	$(VENV)/bin/hotmerge serve $(ARGS)

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

test-gpu: setup
	$(PY) -m pytest -q -m gpu $(ARGS)

bench: setup
	$(PY) benchmarks/merge_latency.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check server kernels tests benchmarks proto
	$(VENV)/bin/ruff format --check server kernels tests benchmarks proto

format: setup
	$(VENV)/bin/ruff format server kernels tests benchmarks proto
	$(VENV)/bin/ruff check --fix server kernels tests benchmarks proto

clean:
	rm -rf $(VENV) build *.egg-info server/hotmerge/v1/*_pb2*.py server/hotmerge/v1/*_pb2*.pyi
