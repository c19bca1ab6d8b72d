"""Harvest throughput: vLLM with the plugin against transformers' forward hook, same run, same contexts.

    python bench/harvest_engines.py [--contexts 64] [--rounds 2] [--dtypes float32,bfloat16]

Both harvest the default model's layer 15 (resid_post) over 256-token contexts, at each dtype, as
``sae-serve harvest --engine hf|vllm`` does: transformers 8 contexts per forward, vLLM every
context at once (its scheduler batches them); both stop after layer 15 (transformers by raising in
the hook, vLLM through ``hidden_states.stop_after``). Rounds alternate (A B A B); tokens/s and their
ratios are printed as JSON and appended to bench/results/harvest_engines.jsonl. ``vllm_over_hf``
compares the same dtype; ``vllm_over_hf_float32`` compares each vLLM dtype with what
``--engine hf`` harvests in (float32).

``gemm_floor_tokens_per_s``: the same run's rate of the model's linear layers alone (layers 0 to 15:
q, k, v, o, gate, up, down, at the model's shapes, the fastest of torch's GEMM and vLLM's oneDNN
one over 2,048 and 8,192 rows): no engine that computes those layers harvests faster, so
``max_speedup_over_hf`` (floor / transformers) bounds what any engine can gain at that dtype.
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
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from sae_serve.engines.vllm_harvest import VllmActivations
    from sae_serve.models import prepare_model
    from sae_serve.train.activations import layer_activations

    folder = prepare_model()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 49152, size=(args.contexts, CTX_LEN)))
    dtypes = args.dtypes.split(",")
    engines = {}
    for dtype in dtypes:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        engines[f"hf_{dtype}"] = lambda b, model=model: torch.cat(
            [layer_activations(model, b[i:i + 8], LAYER) for i in range(0, len(b), 8)])
        engines[f"vllm_{dtype}"] = VllmActivations(folder, LAYER, CTX_LEN, dtype=dtype, seed=0)

    rates: dict[str, list[float]] = {name: [] for name in engines}
    diffs: dict[str, float] = {}
    for run in engines.values():  # warm-up
        run(ids[:8])
    for _ in range(args.rounds):
        for dtype in dtypes:
            got = {}
            for name in (f"hf_{dtype}", f"vllm_{dtype}"):
                start = time.perf_counter()
                with torch.inference_mode():
                    got[name] = engines[name](ids).float()
                rates[name].append(ids.numel() / (time.perf_counter() - start))
            want = got[f"hf_{dtype}"]
            diffs[dtype] = round(float((got[f"vllm_{dtype}"] - want).abs().max() / want.abs().max()), 6)

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)), 3)

    result = {
        "bench": "harvest_engines", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "contexts": args.contexts, "ctx_len": CTX_LEN,
        "tokens_per_s": {name: round(statistics.median(r)) for name, r in rates.items()},
        "vllm_over_hf": {dtype: ratio(f"vllm_{dtype}", f"hf_{dtype}") for dtype in dtypes},
        "vllm_over_hf_float32": {dtype: ratio(f"vllm_{dtype}", "hf_float32") for dtype in dtypes
                                 if "float32" in dtypes},
        "max_abs_diff_over_max_abs": diffs,
    }
    floors = {dtype: gemm_floor(folder, getattr(torch, dtype)) for dtype in dtypes}
    result["gemm_floor_tokens_per_s"] = {dtype: round(rate) for dtype, rate in floors.items()}
    result["max_speedup_over_hf"] = {
        dtype: round(floors[dtype] / statistics.median(rates[f"hf_{dtype}"]), 3) for dtype in dtypes}
    print(json.dumps(result, indent=1))
    with (Path(__file__).parent / "results" / "harvest_engines.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


def gemm_floor(folder: Path, dtype: torch.dtype) -> float:
    """Tokens/s of layers 0 to LAYER's linear maps alone (no attention, norms or activations)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    d, ffn, head = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head
    shapes = [(d, d + 2 * kv), (d, d), (d, 2 * ffn), (ffn, d)]  # qkv, o, gate+up, down (vLLM's fused shapes)
    best = 0.0
    for rows in (2048, 8192):
        weights = [torch.randn(k, n, dtype=dtype) / k**0.5 for k, n in shapes]
        inputs = [torch.randn(rows, k, dtype=dtype) for k, _ in shapes]
        for gemm in _gemms(weights):
            times = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(LAYER + 1):
                    for x, w in zip(inputs, gemm, strict=True):
                        w(x)
                times.append(time.perf_counter() - start)
            best = max(best, rows / statistics.median(times))
    return best


def _gemms(weights: list[torch.Tensor]) -> list[list]:
    """The GEMMs to try: torch's, and vLLM's oneDNN one (prepacked, as its CPU linear layers run)."""
    out = [[lambda x, w=w: torch.mm(x, w) for w in weights]]
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return out
    if hasattr(ops, "create_onednn_mm"):
        handlers = [ops.create_onednn_mm(w, 32) for w in weights]
        out.append([lambda x, h=h: ops.onednn_mm(h, x, None) for h in handlers])
    return out


if __name__ == "__main__":
    main()
