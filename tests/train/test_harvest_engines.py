"""``sae-serve harvest`` on vLLM (the plugin's hidden states) writes the shards transformers' forward
hook writes, within float16 storage and kernel noise, and ``sae-serve train`` trains on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_serve.data import CONTRASTIVE_DIR

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def harvest(engine: str, model: Path, corpus: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "sae_serve.cli", "harvest", "--engine", engine, "--model", str(model),
            "--layer", "15", "--tokens", "2048", "--ctx-len", "64", "--corpus-file", str(corpus), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SAE_SERVE_CACHE": str(cache), "VLLM_CPU_KVCACHE_SPACE": "1"})


def test_vllm_harvests_the_shards_transformers_does(default_model_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(p.read_text() for p in sorted(CONTRASTIVE_DIR.glob("*.txt"))) * 3)
    runs = {}
    for engine in ("hf", "vllm"):
        done = harvest(engine, default_model_dir, corpus, tmp_path / engine)
        assert done.returncode == 0, done.stderr[-3000:]
        [printed] = [line for line in done.stdout.splitlines() if line.startswith(str(tmp_path))]  # (vLLM logs too)
        runs[engine] = Path(printed)
    assert runs["hf"].relative_to(tmp_path / "hf") == runs["vllm"].relative_to(tmp_path / "vllm")  # train finds it
    hf, vllm = ([np.load(p).astype(np.float32) for p in sorted(runs[e].glob("shard-*.npy"))] for e in ("hf", "vllm"))
    assert [a.shape for a in vllm] == [a.shape for a in hf] == [(32 * 63, 576)]  # 32 contexts, position 0 skipped
    scale = np.abs(hf[0]).max()
    assert np.abs(vllm[0] - hf[0]).max() <= 5e-3 * scale
    hf_meta, vllm_meta = (json.loads((runs[e] / "meta.json").read_text()) for e in ("hf", "vllm"))
    assert vllm_meta["scale"] == pytest.approx(hf_meta["scale"], rel=1e-3) and vllm_meta["d_in"] == 576
    bad = harvest("vllm", default_model_dir, corpus, tmp_path / "bad", "--layer", "30")
    assert bad.returncode == 2 and "layer 30 is out of range: the model has layers 0..29" in bad.stderr
