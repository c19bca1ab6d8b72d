"""sae_serve on vLLM against the research tools' path: a transformers model with a forward hook and
HF generate (the pattern of Neuronpedia's HF path and of `steering-vectors`, whose transformers < 5
pin rules out importing it here).

    python bench/vs_hf_hooks.py [--rounds 3] [--concurrency 1,8,32]

The same steered workload on both: every request clamps the same 8 features of the default SAE to
0.5x their max activation, greedy, 64 new tokens, `c` requests at once (HF: one left-padded batch
of c; vLLM: c requests submitted together). The HF hook does what those tools do: a full SAE
encode of every token, the clamp, a decode, the reconstruction error added back. Rounds alternate
(HF, vLLM, HF, vLLM); the median ratio of output tokens/s per concurrency is reported.
Appends JSON to bench/results/vs_hf_hooks.jsonl.
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

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from steering_overhead import prompts  # the same prompts as the overhead benchmark

FEATURES = (4563, 978, 914, 2857, 4263, 3261, 100, 2000)
LAYER = 15


def hf_clamp_hook(sae, targets: torch.Tensor):  # type: ignore[no-untyped-def]
    """A forward hook on the decoder layer: full encode, clamp, decode, error term kept."""
    index = torch.tensor(FEATURES)

    def hook(module, inputs, output):  # type: ignore[no-untyped-def]
        hidden = output[0] if isinstance(output, tuple) else output
        acts = sae.encode(hidden)
        error = hidden - sae.decode(acts)
        acts[..., index] = targets
        steered = sae.decode(acts) + error
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    from sae_serve.config import SaeServeConfig
    from sae_serve.data import DEFAULT_SAE_DIR
    from sae_serve.engines.vllm_offline import SteeredLLM
    from sae_serve.models import prepare_model
    from sae_serve.sae.features import FeatureCatalog
    from sae_serve.sae.formats import load_sae
    from sae_serve.sae.registry import SaeEntry

    model_dir = prepare_model()
    sae = load_sae(DEFAULT_SAE_DIR)
    catalog = FeatureCatalog.load(DEFAULT_SAE_DIR, sae.d_sae)
    targets = torch.tensor([0.5 * catalog.info(f).max_activation for f in FEATURES])
    spec = {"steering": {"interventions": [{"sae": "layer15", "feature": f, "mode": "clamp", "multiple_of_max": 0.5}
                                           for f in FEATURES]}}

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.model.layers[LAYER].register_forward_hook(hf_clamp_hook(sae, targets))
    llm = SteeredLLM(model_dir, SaeServeConfig(saes=(SaeEntry(name="layer15", path=str(DEFAULT_SAE_DIR)),)),
                     dtype="float32", max_model_len=512, seed=0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    def hf_rate(texts: list[str]) -> float:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(**batch, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return len(texts) * args.max_tokens / (time.perf_counter() - start)

    def vllm_rate(texts: list[str]) -> float:
        start = time.perf_counter()
        llm.generate(texts, [spec] * len(texts), params)
        return len(texts) * args.max_tokens / (time.perf_counter() - start)

    levels = [int(c) for c in args.concurrency.split(",")]
    vllm_rate(prompts(max(levels)))  # warm-up (compilation)
    hf_rate(prompts(2))
    rates: dict[int, dict[str, list[float]]] = {c: {"hf": [], "vllm": []} for c in levels}
    for _ in range(args.rounds):
        for c in levels:
            texts = prompts(c)
            rates[c]["hf"].append(hf_rate(texts))
            rates[c]["vllm"].append(vllm_rate(texts))
    result = {
        "bench": "vs_hf_hooks", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "device": "cpu", "max_tokens": args.max_tokens,
        "tokens_per_s": {str(c): {k: round(statistics.median(v), 1) for k, v in r.items()} for c, r in rates.items()},
        "ratio_vllm_to_hf": {str(c): round(statistics.median(v / h for v, h in zip(r["vllm"], r["hf"], strict=True)), 2)
                             for c, r in rates.items()},
    }
    print(json.dumps(result, indent=1))
    with (Path(__file__).parent / "results" / "vs_hf_hooks.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
