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


def test_eval_refuses_an_sae_of_another_width(tmp_path: Path, default_model_dir: Path) -> None:
    from sae_serve.sae.formats import save_sae
    from tests.conftest import make_sae

    save_sae(make_sae("relu", 64, 128, hook_layer=3), tmp_path / "narrow")
    (tmp_path / "c.txt").write_text("Some text to evaluate on. " * 200)
    out = subprocess.run([sys.executable, "-m", "sae_serve.cli", "eval", str(tmp_path / "narrow"), "--contexts", "1",
                          "--corpus-file", str(tmp_path / "c.txt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "d_in=64 but the model's hidden size is 576" in out.stderr
