"""Harvest throughput: vLLM with the plugin against transformers' forward hook, same run, same contexts.

    python bench/harvest_engines.py [--contexts 64] [--rounds 2]

Both harvest the default model's layer 15 (resid_post) over 256-token contexts in float32, as
``sae-serve harvest --engine hf|vllm`` does: transformers 8 contexts per forward and stops after
layer 15; vLLM takes every context at once (its scheduler batches them) and runs the whole model
(its forward cannot stop early). Rounds alternate (A B A B); tokens/s and their ratio are printed
as JSON and appended to bench/results/harvest_engines.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import numpy as np
import torch

CTX_LEN, LAYER = 256, 15


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from sae_serve.engines.vllm_harvest import VllmActivations
    from sae_serve.models import prepare_model
    from sae_serve.train.activations import layer_activations

    folder = prepare_model()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 49152, size=(args.contexts, CTX_LEN)))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vllm = VllmActivations(folder, LAYER, CTX_LEN, dtype="float32", seed=0)

    def hf() -> torch.Tensor:
        return torch.cat([layer_activations(model, ids[b:b + 8], LAYER) for b in range(0, len(ids), 8)])

    def seconds(run) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = run()
        return time.perf_counter() - start, out

    vllm(ids[:8])  # warm-up both
    layer_activations(model, ids[:8], LAYER)
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    diff = 0.0
    for _ in range(args.rounds):
        hf_s, want = seconds(hf)
        vllm_s, got = seconds(lambda: vllm(ids))
        rates["hf"].append(ids.numel() / hf_s)
        rates["vllm"].append(ids.numel() / vllm_s)
        diff = float((got - want).abs().max() / want.abs().max())
    result = {
        "bench": "harvest_engines", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "contexts": args.contexts, "ctx_len": CTX_LEN,
        "hf_tokens_per_s": round(statistics.median(rates["hf"])),
        "vllm_tokens_per_s": round(statistics.median(rates["vllm"])),
        "vllm_over_hf": round(statistics.median(v / h for v, h in zip(rates["vllm"], rates["hf"], strict=True)), 3),
        "max_abs_diff_over_max_abs": round(diff, 6),
    }
    print(json.dumps(result, indent=1))
    with (Path(__file__).parent / "results" / "harvest_engines.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
