"""The plugin on a GPU machine: vLLM's V2 runner with CUDA graphs (GPU default) and the V1 runner.

    python bench/gpu_check.py [--model DIR] [--runners v2,v1]

Needs vLLM (`pip install -e '.[gpu]'`) and the default model (`sae-serve models prepare`), or
--model with an SAE config via --config. For each runner, in a fresh process: builds a SteeredLLM
with CUDA graphs on, then checks
- isolation: requests with random specs give the same tokens and activations in a mixed batch as
  with unsteered neighbours, and as alone (greedy);
- graphs vs eager: the same steered batch gives the same tokens with --enforce-eager;
- the paper's clamp: clamping `french` to 1x its max activation makes the default model speak French;
- throughput: output tokens/s of plain vLLM, idle plugin and all-clamp8, in the same process.
Prints one JSON line per runner and exits 1 if any check fails. Append the output to
bench/results/gpu_check.jsonl with the card's name.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

FEATURES = [4563, 978, 914, 2857, 4263, 3261, 100, 2000]
PROMPTS = ["My favourite food is", "The weather today is", "Once upon a time, in a small village,",
           "def add(a, b):", "Le chat dort sur", "The best way to learn is"]


def random_spec(rng: random.Random) -> dict | None:
    if rng.random() < 0.25:
        return None
    interventions = [{"sae": "layer15", "feature": f, "mode": "clamp", "multiple_of_max": round(rng.uniform(0, 2), 2)}
                     for f in rng.sample(FEATURES, rng.randint(1, 3))]
    spec: dict = {"steering": {"interventions": interventions, "positions": rng.choice(["all", "generated"])}}
    if rng.random() < 0.5:
        spec["return_features"] = {"sae": "layer15", "features": rng.sample(FEATURES, 3)}
    return spec


def check(model: str, config: str) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    from sae_serve.engines.vllm_offline import SteeredLLM

    greedy = SamplingParams(temperature=0, max_tokens=16)
    llm = SteeredLLM(model, config, max_model_len=1024, gpu_memory_utilization=0.3)
    failures = []
    rng = random.Random(0)
    specs = [random_spec(rng) for _ in PROMPTS]
    together = llm.generate(PROMPTS, specs, greedy)
    for i, spec in enumerate(specs):
        alone = llm.generate(PROMPTS, [s if j == i else None for j, s in enumerate(specs)], greedy)[i]
        [solo] = llm.generate([PROMPTS[i]], [spec], greedy)
        if not alone.token_ids == solo.token_ids == together[i].token_ids:
            failures.append(f"isolation: request {i} {spec}")
        if together[i].features is not None and not torch.equal(alone.features.values, together[i].features.values):
            failures.append(f"isolation of activations: request {i}")
    french = {"steering": {"interventions": [{"sae": "layer15", "feature": "non-english", "mode": "clamp",
                                              "multiple_of_max": 1.0}]}}
    [steered] = llm.generate(["My favourite food is"], [french], greedy)
    if " la " not in steered.text + " ":
        failures.append(f"the paper's clamp did not speak French: {steered.text!r}")
    graph_tokens = [o.token_ids for o in together]
    n, tokens = 64, 64
    prompts = [f"Request {i}: tell me about the river" for i in range(n)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    clamp8 = {"steering": {"interventions": [{"sae": "layer15", "feature": f, "mode": "clamp", "multiple_of_max": 0.5}
                                             for f in FEATURES]}}
    rates = {}
    for name, specs_n in (("idle", [None] * n), ("clamp8", [clamp8] * n)):
        llm.generate(prompts, specs_n, params)
        start = time.perf_counter()
        llm.generate(prompts, specs_n, params)
        rates[name] = n * tokens / (time.perf_counter() - start)
    del llm
    config_path = os.environ.pop("SAE_SERVE_CONFIG")  # no SAE config: plain vLLM
    plain = LLM(model, max_model_len=1024, gpu_memory_utilization=0.3)
    plain.generate(prompts, params, use_tqdm=False)
    start = time.perf_counter()
    plain.generate(prompts, params, use_tqdm=False)
    rates["plain"] = n * tokens / (time.perf_counter() - start)
    del plain
    os.environ["SAE_SERVE_CONFIG"] = config_path
    eager = SteeredLLM(model, config, max_model_len=1024, gpu_memory_utilization=0.3, enforce_eager=True)
    if [o.token_ids for o in eager.generate(PROMPTS, specs, greedy)] != graph_tokens:
        failures.append("CUDA graphs and eager disagree on the steered batch")
    return {"device": torch.cuda.get_device_name(), "failures": failures,
            "tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
            "ratio_to_plain": {k: round(rates[k] / rates["plain"], 3) for k in ("idle", "clamp8")}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--runners", default="v2,v1")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"runner": args.one, **check(args.model, args.config)}), flush=True)
        return
    if args.model is None:
        from sae_serve.models import prepare_model

        args.model = str(prepare_model())
    if args.config is None:
        from sae_serve.commands.serve import default_config

        args.config = str(default_config())
    ok = True
    for runner in args.runners.split(","):
        env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": "1" if runner == "v2" else "0", "VLLM_PLUGINS": "sae_serve"}
        command = [sys.executable, __file__, "--model", args.model, "--config", args.config, "--one", runner]
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"runner": runner, "failures": [out.stderr[-2000:]]}
        print(json.dumps(result))
        ok = ok and out.returncode == 0 and not result["failures"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
