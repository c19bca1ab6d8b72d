"""Steering overhead: vLLM with the sae_serve plugin against plain vLLM, same process, same prompts.

    python bench/steering_overhead.py [--rounds 3] [--eager] [--cases idle,guard4]

Cases (all requests submitted together, greedy, 64 new tokens each):
  idle        plugin loaded with the default SAE, nobody steers
  clamp8      every request clamps the same 8 features
  distinct64  64 requests, each with its own configuration (features and strengths)
  distinct256 256 requests in one batch, each with its own configuration (against plain with 256)
  watch32     every request reads 32 features on every token
  topk8       every request reads its top 8 features on every token (a full encode)
  guard4      every request carries 4 server-wide guardrails (3 flag rules and an abort, on 4 features,
              thresholds no token reaches: the watching is what is measured)
  states4     another engine exposing layers 3, 8 and 22 besides the SAE's 15: every request reads its
              prompt's last-token hidden states at those 4 layers
  exposed_idle  that engine, nobody reads (what exposing 3 more layers costs)
  monitor4    a third engine with metrics on: the SAE's 4-feature watchlist on every token, nobody steers
  clamp8_fixed, distinct256_fixed   a fourth engine on the fixed-shape op (op.fixed_shapes, 16 slots)
Each round runs plain vLLM and every case back to back (A B A B); the ratio of output tokens/s to
plain is taken per round and the median reported. Added time to first token: the same batch with
max_tokens=1 (prefill and one token), case minus plain, in ms for the whole batch.
Prefix caching is off on every engine (see the comment in main). Appends JSON to
bench/results/steering_overhead.jsonl.
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

WORDS = ("the", "river", "city", "garden", "music", "winter", "science", "history", "market", "friend", "ocean",
         "mountain", "story", "letter", "engine", "village", "language", "window", "morning", "dinner", "forest")


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 10)) for i in range(n)]


def distinct(n: int) -> list[dict | None]:
    """n configurations, no two alike (features and strengths)."""
    return [{"steering": {"interventions": [
        {"sae": "layer15", "feature": (i * 37) % 4608, "mode": "add", "value": 0.5 + i / n},
        {"sae": "layer15", "feature": (i * 91 + 5) % 4608, "mode": "scale", "value": 0.5}]}} for i in range(n)]


def cases(n: int) -> dict[str, list[dict | None]]:
    clamp = [{"sae": "layer15", "feature": f, "mode": "clamp", "multiple_of_max": 0.5}
             for f in (4563, 978, 914, 2857, 4263, 3261, 100, 2000)]
    return {
        "idle": [None] * n,
        "clamp8": [{"steering": {"interventions": clamp}}] * n,
        "distinct64": distinct(n),
        "distinct256": distinct(256),
        "watch32": [{"return_features": {"sae": "layer15", "features": list(range(0, 4608, 144))}}] * n,
        "topk8": [{"return_features": {"sae": "layer15", "top_k": 8}}] * n,
        "guard4": [{"server_guardrails": [
            {"name": f"rule{i}", "action": "abort" if i == 3 else "flag",
             "when": {"sae": "layer15", "feature": f, "above": {"multiple_of_max": 10.0}}}
            for i, f in enumerate((4563, 978, 914, 2857))]}] * n,
        "states4": [{"return_hidden_states": {"layers": list(STATE_LAYERS), "positions": "last"}}] * n,
    }


STATE_LAYERS = (3, 8, 15, 22)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases (default: all)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from sae_serve.config import HiddenStatesConfig, MetricsConfig, OpConfig, SaeServeConfig
    from sae_serve.data import DEFAULT_SAE_DIR
    from sae_serve.engines.vllm_offline import SteeredLLM
    from sae_serve.models import prepare_model
    from sae_serve.sae.registry import SaeEntry

    model = prepare_model()
    # No prefix caching: every round repeats the prompts, and a reading request always computes its
    # prompt (unique cache salt) while plain vLLM would serve it from cache; the op is what we measure.
    kwargs = {"enforce_eager": args.eager, "dtype": "float32", "max_model_len": 512, "seed": 0,
              "enable_prefix_caching": False}
    plain = LLM(model=str(model), **kwargs)  # created before SAE_SERVE_CONFIG is set: no SAEs
    saes = (SaeEntry(name="layer15", path=str(DEFAULT_SAE_DIR)),)
    wanted = set(args.cases.split(",")) if args.cases else None
    workload = cases(args.requests)
    engines = {"steered": SaeServeConfig(saes=saes)}
    if wanted is None or "monitor4" in wanted:
        engines["monitored"] = SaeServeConfig(saes=saes, metrics=MetricsConfig(enabled=True))
    if wanted is None or wanted & {"states4", "exposed_idle"}:
        engines["states"] = SaeServeConfig(saes=saes, hidden_states=HiddenStatesConfig(layers=STATE_LAYERS))
    if wanted is None or wanted & {"clamp8_fixed", "distinct256_fixed"}:
        engines["fixed"] = SaeServeConfig(saes=saes, op=OpConfig(fixed_shapes=True))
    built = {name: SteeredLLM(model, config, **kwargs) for name, config in engines.items()}
    steered, monitored, fixed, states = (built["steered"], built.get("monitored"), built.get("fixed"),
                                         built.get("states"))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1)
    runs = {name: (steered, specs) for name, specs in workload.items()}
    runs["states4"] = (states, workload["states4"])
    runs["exposed_idle"] = (states, workload["idle"])
    runs["monitor4"] = (monitored, workload["idle"])
    runs["clamp8_fixed"] = (fixed, workload["clamp8"])
    runs["distinct256_fixed"] = (fixed, workload["distinct256"])
    runs = {name: run for name, run in runs.items() if wanted is None or name in wanted}

    def seconds(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    plain.generate(prompts(256), params, use_tqdm=False)  # warm-up every engine and batch size
    steered.generate(prompts(256), workload["distinct256"], params)
    if monitored is not None:
        monitored.generate(prompts(args.requests), workload["idle"], params)
    if fixed is not None:
        fixed.generate(prompts(256), workload["distinct256"], params)
    if states is not None:
        states.generate(prompts(args.requests), workload["states4"], params)
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    added_ttft_ms: dict[str, list[float]] = {name: [] for name in runs}
    plain_ttft_ms: dict[str, list[float]] = {name: [] for name in runs}
    plain_rates = []
    for _ in range(args.rounds):
        for name, (engine, specs) in runs.items():
            texts = prompts(len(specs))
            base = seconds(lambda t=texts: plain.generate(t, params, use_tqdm=False))
            case = seconds(lambda e=engine, t=texts, s=specs: e.generate(t, s, params))
            ratios[name].append(base / case)
            plain_rates.append(len(texts) * args.max_tokens / base)
            base = seconds(lambda t=texts: plain.generate(t, first, use_tqdm=False))
            case = seconds(lambda e=engine, t=texts, s=specs: e.generate(t, s, first))
            added_ttft_ms[name].append(1000 * (case - base))
            plain_ttft_ms[name].append(1000 * base)
    result = {
        "bench": "steering_overhead", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "mode": "eager" if args.eager else "compiled",
        "requests": args.requests, "max_tokens": args.max_tokens,
        "plain_tokens_per_s": round(statistics.median(plain_rates), 1),  # over every case's batch size
        "ratio_to_plain": {name: round(statistics.median(r), 3) for name, r in ratios.items()},
        "ratios_per_round": {name: [round(x, 3) for x in r] for name, r in ratios.items()},
        "added_ttft_ms_per_batch": {name: round(statistics.median(r), 1) for name, r in added_ttft_ms.items()},
        "plain_ttft_ms_per_batch": {name: round(statistics.median(r), 1) for name, r in plain_ttft_ms.items()},
    }
    print(json.dumps(result, indent=1))
    with (Path(__file__).parent / "results" / "steering_overhead.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
