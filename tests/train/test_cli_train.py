"""``sae-serve train`` end to end on a tiny model, then resumed."""

import json
import subprocess
import sys
from pathlib import Path

from sae_serve import load_sae
from sae_serve.data import CONTRASTIVE_DIR


def test_train_then_resume(tiny_llama_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(p.read_text() for p in sorted(CONTRASTIVE_DIR.glob("*.txt"))) * 3)
    args = [sys.executable, "-m", "sae_serve.cli", "train", "--out", str(tmp_path / "sae"), "--model",
            str(tiny_llama_dir), "--layer", "1", "--architecture", "topk", "--d-sae", "32", "--k", "4",
            "--tokens", "4096", "--batch-size", "256", "--ctx-len", "32", "--corpus-file", str(corpus)]
    env = {"SAE_SERVE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    sae = load_sae(tmp_path / "sae")
    assert (sae.d_in, sae.d_sae, sae.hook_layer, sae.cfg.architecture) == (64, 32, 1, "topk")
    history = json.loads((tmp_path / "sae" / "training.json").read_text())["history"]
    assert history[-1]["step"] == 16 and (tmp_path / "sae" / "loss_curve.png").stat().st_size > 1000
    weights = (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "resumed from" in again.stderr and "at step 16 of 16" in again.stderr
    assert (tmp_path / "sae" / "sae_weights.safetensors").read_bytes() == weights
    bad = subprocess.run([*args[:-1], str(tmp_path / "missing.txt")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "missing.txt: no such corpus file" in bad.stderr
    out_of_range = subprocess.run([*args[:9], "7", *args[10:]], capture_output=True, text=True, env=env)
    assert out_of_range.returncode == 2 and "layer 7 is out of range" in out_of_range.stderr
