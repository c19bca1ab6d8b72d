"""Data-parallel training under ``torchrun`` (2 processes, gloo on CPU) equals one process on the
same data in the same order: the trainer directly for each architecture, and ``sae-serve train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_serve import load_sae
from sae_serve.data import CONTRASTIVE_DIR
from tests.train.ddp_worker import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_train_what_one_does(tmp_path: Path) -> None:
    torchrun("tests/train/ddp_worker.py", str(tmp_path / "two.pt"))
    one = subprocess.run([sys.executable, "tests/train/ddp_worker.py", str(tmp_path / "one.pt")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    got, want = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert sorted(got) == sorted(want) and {name.split(".")[0] for name in got} == set(ARCHITECTURES)
    for name, value in want.items():  # weights and the last step's loss, FVU, L0 and dead fraction
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert got["topk.stats"][3] > 0  # features went dead, so AuxK (reduced across processes) was trained


@pytest.mark.slow
def test_sae_serve_train_under_torchrun(tiny_llama_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(p.read_text() for p in sorted(CONTRASTIVE_DIR.glob("*.txt"))) * 3)
    args = ["train", "--model", str(tiny_llama_dir), "--layer", "1", "--architecture", "batchtopk", "--d-sae", "32",
            "--k", "4", "--tokens", "4096", "--batch-size", "256", "--ctx-len", "32", "--corpus-file", str(corpus)]
    env = {"SAE_SERVE_CACHE": str(tmp_path / "cache")}
    done = torchrun("-m", "sae_serve.cli", *args, "--out", str(tmp_path / "two"), env=env)
    assert done.stdout.strip() == str(tmp_path / "two")  # printed once, by the first process
    one = subprocess.run([sys.executable, "-m", "sae_serve.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two_sae, one_sae = load_sae(tmp_path / "two"), load_sae(tmp_path / "one")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(two_sae, name), getattr(one_sae, name), rtol=1e-4, atol=1e-5)
    histories = [json.loads((tmp_path / run / "training.json").read_text())["history"] for run in ("two", "one")]
    assert [h["step"] for h in histories[0]] == [h["step"] for h in histories[1]] and histories[0][-1]["step"] == 16
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "sae_serve.cli", *args[:-6], "--batch-size", "255", *args[-4:], "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, **env})
    assert bad.returncode != 0 and "--batch-size 255 does not divide among 2 processes" in bad.stderr
