"""Files written by the libraries themselves: SAELens and EleutherAI sparsify, installed from PyPI in a
throwaway environment (it sees this environment's torch through a .pth file, so it downloads only
what they add). Each library saves random SAEs its own way and records its own encode and decode of
one input; ours must load the file and compute the same, or refuse it by name."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_serve.errors import SaeFormatError
from sae_serve.sae.formats import load_sae

pytestmark = pytest.mark.slow
LIBRARIES = ("sae-lens==6.54.12", "eai-sparsify==1.3.3")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("third_party")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "sae_serve_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    try:  # (within pytest's 900 s per test, so a slow index skips rather than fails)
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", *LIBRARIES], capture_output=True,
                                 text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{LIBRARIES} did not install from the package index within 10 minutes")
    if install.returncode != 0:
        pytest.skip(f"{LIBRARIES} did not install from the package index: {install.stderr[-500:]}")
    out = root / "files"
    out.mkdir()
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}  # (its Triton decoder needs a GPU)
    run = subprocess.run([str(python), str(Path(__file__).with_name("third_party_writer.py")), str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _same_as_the_library(folder: Path) -> None:
    expected = load_file(str(folder.with_name(folder.name + ".expected.safetensors")))
    sae = load_sae(folder)
    torch.testing.assert_close(sae.encode(expected["x"]), expected["acts"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae(expected["x"]), expected["recon"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["saelens-standard", "saelens-topk-rescaled", "saelens-jumprelu", "sparsify/layers.4"])
def test_saelens_and_sparsify_files_compute_what_their_library_computes(written: Path, name: str) -> None:
    _same_as_the_library(written / name)


@pytest.mark.parametrize(("name", "field"), [
    ("saelens-layer-norm", "normalize_activations='layer_norm'"), ("saelens-hook-z", "reshape_activations='hook_z'"),
    ("sparsify/transcoder/layers.4", "transcode=True"), ("sparsify/skip/layers.4", "skip_connection=True")])
def test_their_options_we_do_not_compute_are_refused_by_name(written: Path, name: str, field: str) -> None:
    with pytest.raises(SaeFormatError, match=field):
        load_sae(written / name)
