"""The steering op inside a captured CUDA graph, against the decode step it rides in.

    python bench/gpu_op.py [--out FILE] [--batches 1,8,32,128,256]

vLLM cannot run on the GPU machines lent here (vLLM 0.32's wheel needs torch 2.13 and is 330 MB;
a machine receives 64 MiB and has torch 2.11), so this measures what is ours on the GPU. A decode
step shaped like Llama-3.1-8B (32 layers of the q/k/v/o and gated-MLP weight products with
RMSNorm and vLLM's deferred residual add, random bf16 weights; attention over the KV cache is left
out) is captured in one CUDA graph, as vLLM captures decode steps, with the sae_serve op on layer
16's output through the same runtime, tables and ``sae_serve::steer_`` op the plugin installs. A
65,536-feature JumpReLU SAE built in code. Variants, interleaved, per batch size (one token per
request):
- plain: the step without the op;
- idle: the op captured, nobody steers (what the CUDA-graph path pays every step);
- clamp8: every request clamps the same 8 features; distinct: each clamps 8 features of its own;
- clamp8_read: clamp8 and each reads 8 features back;
- watch32: nobody steers, 32 features monitored for Prometheus on every token (inside the graph);
- full_encode: the step with the whole 65,536-feature encode and a top-8, what a top-k readout or
  a TopK SAE would cost (the reason those stay off the graph path).
Reports ms per step (median of interleaved rounds, CUDA events) and the tokens/s ratio to plain,
and the host time ``plan_step`` takes to fill the tables for a step of all-distinct requests.
Checks that an idle step is bit-identical to plain and that clamp8 changes the output. On a CPU
it runs eagerly with tiny sizes (a smoke test of the script; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from sae_serve.engines.protocol import admit
from sae_serve.engines.vllm_runtime import SteeringRuntime, StepBatch
from sae_serve.engines.vllm_site import bind_site
from sae_serve.metrics import WorkerMetrics
from sae_serve.sae.model import SaeConfig, build_sae
from sae_serve.sae.registry import registry_of
from sae_serve.steering.fixed import Capacity, FixedTables
from sae_serve.steering.spec import RequestSpec
from sae_serve.steering.watch import Watch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SECRET = b"bench-secret"


class DecodeStack:
    """An 8B-shaped decoder stack: per layer the weight products of a decode step."""

    def __init__(self, layers: int, d: int, ffn: int, kv: int) -> None:
        def w(n_in: int, n_out: int) -> torch.Tensor:
            return torch.randn(n_in, n_out, device=DEVICE, dtype=DTYPE) / n_in**0.5

        self.d = d
        self.layers = [(w(d, d + 2 * kv), w(d, d), w(d, 2 * ffn), w(ffn, d)) for _ in range(layers)]

    def forward(self, x: torch.Tensor, residual: torch.Tensor, site: Callable | None, at: int) -> torch.Tensor:
        for i, (qkv, o, gate_up, down) in enumerate(self.layers):
            residual = residual + x  # vLLM's fused add-norm
            x = (_norm(residual) @ qkv)[:, : self.d] @ o  # attention over the KV cache left out
            residual = residual + x
            gate, up = (_norm(residual) @ gate_up).chunk(2, dim=-1)
            x = (torch.nn.functional.silu(gate) * up) @ down
            if i == at and site is not None:
                site(x, residual)
        return x + residual


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


def capture(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` as one CUDA graph replay (its output tensor is static), or as is on a CPU."""
    if not CUDA:
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out
    return replay


def step_ms(run: Callable[[], torch.Tensor], reps: int) -> float:
    if CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - t) * 1e3 / reps


def make_sae(d: int, f: int) -> object:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(f, d, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    tensors = {"W_enc": w.T.contiguous(), "b_enc": torch.zeros(f), "W_dec": w, "b_dec": torch.zeros(d),
               "threshold": torch.full((f,), 0.5)}
    return build_sae(SaeConfig("jumprelu", d, f, 16), {n: t.to(DEVICE, DTYPE) for n, t in tensors.items()}, "bench")


def specs_for(variant: str, n: int, d_sae: int, rng: random.Random) -> list[dict | None]:
    if variant in ("plain", "idle", "watch32", "full_encode"):
        return [None] * n
    same = rng.sample(range(d_sae), 8)
    out = []
    for _ in range(n):
        features = rng.sample(range(d_sae), 8) if variant == "distinct" else same
        spec: dict = {"steering": {"interventions": [{"sae": "s", "feature": f, "mode": "clamp", "value": 4.0}
                                                     for f in features]}}
        if variant == "clamp8_read":
            spec["return_features"] = {"sae": "s", "features": features}
        out.append(spec)
    return out


def plan(runtime: SteeringRuntime, specs: list[dict | None], tag: str) -> float:
    """Fill the tables for a decode step of ``specs``; the host seconds it took."""
    n = len(specs)
    batch = StepBatch([f"{tag}{i}" for i in range(n)], list(range(n + 1)), [100] * n, [90] * n)
    extra = {rid: admit(RequestSpec.model_validate(s), secret=SECRET, key=rid).extra_args if s else None
             for rid, s in zip(batch.req_ids, specs, strict=True)}
    runtime.plan_step(batch, extra, batch.req_ids)  # resolves each request once, as in serving
    start = time.perf_counter()
    runtime.plan_step(batch, extra, batch.req_ids)  # a later step of the same requests
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_batch(stack: DecodeStack, runtime: SteeringRuntime, site: int, sae, watch: Watch, n: int, args) -> dict:
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, stack.d, generator=gen) * 0.1).to(DEVICE, DTYPE)
    residual = torch.randn(n, stack.d, generator=gen).to(DEVICE, DTYPE)

    def op(h: torch.Tensor, r: torch.Tensor) -> None:
        torch.ops.sae_serve.steer_(h, r, site)

    def encode(h: torch.Tensor, r: torch.Tensor) -> None:
        top = torch.topk(sae.encode(h + r), 8, dim=-1)
        runtime_sink.copy_(top.values)

    runtime_sink = torch.zeros(n, 8, device=DEVICE, dtype=DTYPE)
    plan(runtime, [None] * n, "warm")
    graphs = {"plain": capture(lambda: stack.forward(x, residual, None, args.at)),
              "op": capture(lambda: stack.forward(x, residual, op, args.at)),
              "full_encode": capture(lambda: stack.forward(x, residual, encode, args.at))}
    runtime.watches = {"s": watch}  # from here on the op also monitors, in the graph captured next
    graphs["watch32"] = capture(lambda: stack.forward(x, residual, op, args.at))
    rng = random.Random(n)
    variants = ["plain", "idle", "clamp8", "distinct", "clamp8_read", "watch32", "full_encode"]
    specs = {v: specs_for(v, n, sae.d_sae, rng) for v in variants}
    plain_out = graphs["plain"]().clone()
    plan(runtime, specs["idle"], "idle")
    idle_exact = torch.equal(graphs["op"](), plain_out)
    plan(runtime, specs["clamp8"], "check")
    clamp_steers = not torch.equal(graphs["op"](), plain_out)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:  # rotate: no order bias
            plan(runtime, specs[v], f"{v}{n}-")
            graph = graphs.get(v, graphs["op"])
            times[v].append(step_ms(graph, args.reps))
    host = plan(runtime, specs["distinct"], f"distinct{n}-")
    ms = {v: statistics.median(t) for v, t in times.items()}
    return {"batch": n, "idle_bit_identical_to_plain": idle_exact, "clamp8_changes_the_output": clamp_steers,
            "ms_per_step": {v: round(t, 4) for v, t in ms.items()},
            "ratio_to_plain": {v: round(ms["plain"] / t, 4) for v, t in ms.items() if v != "plain"},
            "fill_tables_host_us": round(host * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32 if CUDA else 2)
    parser.add_argument("--d-model", type=int, default=4096 if CUDA else 64)
    parser.add_argument("--d-ffn", type=int, default=14336 if CUDA else 128)
    parser.add_argument("--kv", type=int, default=1024 if CUDA else 16)
    parser.add_argument("--d-sae", type=int, default=65536 if CUDA else 1024)
    parser.add_argument("--at", type=int, default=16 if CUDA else 1, help="layer whose output the SAE reads")
    parser.add_argument("--batches", default="1,8,32,128,256" if CUDA else "1,8")
    parser.add_argument("--rounds", type=int, default=5 if CUDA else 1)
    parser.add_argument("--reps", type=int, default=20 if CUDA else 2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_op.jsonl"))
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    stack = DecodeStack(args.layers, args.d_model, args.d_ffn, args.kv)
    sae = make_sae(args.d_model, args.d_sae)
    registry = registry_of({"s": sae})
    runtime = SteeringRuntime(registry, SECRET, graph_mode=True)
    runtime.tables = {"s": FixedTables(sae, Capacity(tokens=max(batches), slots=16, requests=max(batches)))}
    site = bind_site(runtime, registry.saes["s"])
    runtime.metrics = WorkerMetrics(CollectorRegistry())
    watched = list(range(0, args.d_sae, args.d_sae // 32))[:32]
    watch = Watch(sae, "s", watched, [str(f) for f in watched], [0.5] * 32, max(batches))
    rows = []
    for n in batches:
        runtime.watches = {}
        rows.append(bench_batch(stack, runtime, site, sae, watch, n, args))
        print(json.dumps(rows[-1]), flush=True)
    result = {"bench": "gpu_op", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
              "layers": args.layers, "d_model": args.d_model, "d_ffn": args.d_ffn, "d_sae": args.d_sae,
              "dtype": str(DTYPE), "rows": rows}
    with Path(args.out).open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
