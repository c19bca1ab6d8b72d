"""deploy/Dockerfile.cpu built and run for real with podman (no Docker engine here), as a user runs
it: a steered request and /metrics from outside the container, then SIGTERM to the container while
streams are mid-generation. `make test-container` runs it (the build takes minutes, too long for CI);
SAE_SERVE_CONTAINER_BASE names the base image, made offline by scripts/container_base.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.harness import API_KEY, AUTH, FRENCH, free_port, metric

ROOT = Path(__file__).resolve().parents[2]
BASE = os.environ.get("SAE_SERVE_CONTAINER_BASE")
IMAGE = "localhost/sae-serve:test-cpu"
# runc (crun refuses this machine's hybrid cgroups) and the limits this sandbox allows.
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
TORCH_WHEELS = Path("/opt/wheels")  # this machine's CPU torch (download.pytorch.org is out of reach)

pytestmark = [pytest.mark.container, pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not BASE or shutil.which("podman") is None,
                                 reason="make test-container runs this (podman and a base image)")]


@pytest.fixture(scope="module")
def image() -> str:
    subprocess.run([*PODMAN, "build", *LIMITS, "--network", "host", "--volume", f"{TORCH_WHEELS}:/wheels:ro",
                    "--build-arg", f"BASE={BASE}", "--build-arg", "TORCH_FROM=--find-links /wheels",
                    "-f", "deploy/Dockerfile.cpu", "-t", IMAGE, "."], cwd=ROOT, check=True)
    return IMAGE


@pytest.fixture(scope="module")
def container(image: str):
    """The image's own entrypoint, its port published on the host's loopback."""
    port, name = free_port(), f"sae-serve-test-{os.getpid()}"
    subprocess.run([*PODMAN, "run", "-d", *LIMITS, "--name", name, "--shm-size", "1g", "-p", f"127.0.0.1:{port}:8000",
                    image, "--", "--api-key", API_KEY, "--max-model-len", "1024"], check=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline and _running(name):
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    else:
        logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True).stdout
        subprocess.run([*PODMAN, "rm", "-f", name])
        pytest.fail(f"the container never became healthy: {logs[-3000:]}")
    yield name, base
    subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)


def _running(name: str) -> bool:
    state = subprocess.run([*PODMAN, "inspect", "--format", "{{.State.Running}}", name], capture_output=True, text=True)
    return state.stdout.strip() == "true"


def completion(base: str, **extra) -> httpx.Response:
    model = httpx.get(base + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": "My favourite food is", "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=120)


def test_the_image_serves_steering_and_metrics_from_outside(container) -> None:
    _, base = container
    plain, steered = completion(base).json(), completion(base, **FRENCH).json()
    assert steered["choices"][0]["text"] != plain["choices"][0]["text"]
    assert steered["choices"][0]["text"].startswith(" la la"), steered  # the shipped SAE's French feature
    assert metric(base, "sae_serve_steered_requests_total") == 1
    unknown = completion(base, steering={"interventions": [{"sae": "layer15", "feature": 999999, "mode": "clamp",
                                                            "value": 1}]})
    assert unknown.status_code == 400 and "feature" in unknown.json()["error"]["message"], unknown.text


def test_sigterm_to_the_container_drains_streams_then_exits_zero(container) -> None:
    name, base = container
    model = httpx.get(base + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]
    started, outcomes = threading.Semaphore(0), []

    def stream(i: int) -> None:
        body = {"model": model, "prompt": f"Story {i}:", "max_tokens": 40, "min_tokens": 40, "stream": True,
                "temperature": 0}
        finish = None
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            for n, line in enumerate(line for line in r.iter_lines() if line.startswith("data: {")):
                if n == 0:
                    started.release()
                finish = json.loads(line.removeprefix("data: "))["choices"][0].get("finish_reason") or finish
        outcomes.append(finish)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=120)
    subprocess.run([*PODMAN, "kill", "--signal", "TERM", name], check=True)
    for t in threads:
        t.join(timeout=120)
    assert outcomes == ["length"] * 4  # every stream in flight finished, none cut off
    exit_code = subprocess.run([*PODMAN, "wait", name], capture_output=True, text=True, timeout=120).stdout
    assert exit_code.strip() == "0", exit_code
