"""What the CUDA-graph path promises: the steering op, captured once, replays the steering of
whatever requests each later step holds, with the tables refilled before each replay as vLLM's
runners do (the V2 ModelState's prepare_inputs, or V1's step hook, on the main stream, then the
replay). Each step's rows must equal the eager segment path, and a request's rows must be
bit-identical whatever its neighbours ask; the watched features' totals, kept inside the graph,
must equal observing each real token; the hidden states requests read, gathered from a persistent
buffer after each step, must be their rows before the edit. On a GPU the op runs in a real
torch.cuda.CUDAGraph; on a CPU (CI) the same steps run it eagerly, since graphs need a GPU. bench/README.md, "GPU",
records the GPU run."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from sae_serve.engines.protocol import admit
from sae_serve.engines.state_copies import StateBuffers
from sae_serve.engines.vllm_runtime import SteeringRuntime, StepBatch
from sae_serve.engines.vllm_site import bind_site, replays_cuda_graphs
from sae_serve.metrics import WorkerMetrics
from sae_serve.steering.fixed import Capacity, FixedTables
from sae_serve.steering.hook import apply_plan_split_
from sae_serve.steering.plan import build_plan, prepare
from sae_serve.steering.spec import RequestSpec, resolve
from sae_serve.steering.watch import Watch
from tests.steering.test_hook import D_IN, registry
from tests.steering.test_watch import FEATURES, NAMES, THRESHOLDS, flush, reference, samples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = 32  # the captured batch: steps pad up to it
SECRET = b"test-deployment-secret"
LAYER = 2  # the SAE's layer, whose hidden states requests may read too


class CapturedOp:
    """The op over static (ROWS, D_IN) buffers, as a model runner's graph holds it."""

    def __init__(self, site: int) -> None:
        self.hidden = torch.zeros(ROWS, D_IN, device=DEVICE)
        self.residual = torch.zeros(ROWS, D_IN, device=DEVICE)
        self.site = site
        self.graph: torch.cuda.CUDAGraph | None = None
        if DEVICE == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capture stream, as torch requires
                self._op()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._op()

    def _op(self) -> None:
        torch.ops.sae_serve.steer_(self.hidden, self.residual, self.site)

    def __call__(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        self.hidden.copy_(hidden)
        self.residual.copy_(residual)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._op()
        return self.hidden.clone()


def _random_spec(rng: random.Random) -> dict | None:
    kind = rng.choice(["none", "clamp", "scale", "add", "vector", "read"])
    if kind == "none":
        return None
    features = rng.sample(range(64), rng.randint(1, 3))
    if kind == "vector":
        steering = {"vectors": [{"name": "v", "coefficient": rng.uniform(-3, 3)}]}
    elif kind == "read":
        return {"return_features": {"sae": "s", "features": features}}
    else:
        value = {"clamp": rng.uniform(0, 8), "scale": rng.uniform(0, 3), "add": rng.uniform(-2, 2)}[kind]
        steering = {"interventions": [{"sae": "s", "feature": f, "mode": kind, "value": value} for f in features]}
    steering["positions"] = rng.choice(["all", "prompt", "generated"])
    spec = {"steering": steering}
    if rng.random() < 0.5:
        spec["return_features"] = {"sae": "s", "features": features[:2]}
    if rng.random() < 0.5:
        spec["return_hidden_states"] = {"layers": [LAYER], "positions": "all"}
    return spec


def _step(rng: random.Random, tag: str) -> tuple[StepBatch, list[dict | None]]:
    """A random mix of prefill chunks and decode tokens that fits ROWS - 1 rows (the rest: padding)."""
    n = rng.randint(1, 5)
    lengths = [rng.choice([1, 1, rng.randint(2, 6)]) for _ in range(n)]
    qsl = [0]
    for length in lengths:
        qsl.append(qsl[-1] + length)
    computed = [rng.randint(0, 6) for _ in range(n)]
    prompt_lens = [c + rng.randint(0, 4) for c in computed]
    specs = [_random_spec(rng) for _ in range(n)]
    return StepBatch([f"{tag}-{i}" for i in range(n)], qsl, computed, prompt_lens), specs


@pytest.fixture(scope="module")
def graph():
    reg = registry("jumprelu")
    loaded = reg.saes["s"]
    loaded.sae.to(DEVICE)
    runtime = SteeringRuntime(reg, SECRET, graph_mode=True)
    runtime.tables = {"s": FixedTables(loaded.sae, Capacity(tokens=ROWS, slots=4, requests=8))}
    prom = CollectorRegistry()
    runtime.metrics = WorkerMetrics(prom)
    runtime.watches = {"s": Watch(loaded.sae, "s", FEATURES, NAMES, THRESHOLDS, max_rows=ROWS)}
    runtime.hidden_layers, runtime.d_model = (LAYER,), D_IN
    runtime.state_buffers = StateBuffers((LAYER,), ROWS, D_IN, torch.float32, torch.device(DEVICE))
    return SimpleNamespace(reg=reg, runtime=runtime, op=CapturedOp(bind_site(runtime, loaded, LAYER)), prom=prom,
                           watched=[])


def _run(graph, batch: StepBatch, specs: list[dict | None], stream) -> tuple[torch.Tensor, dict]:
    extra = {rid: admit(RequestSpec.model_validate(spec), secret=SECRET, key=rid).extra_args if spec else None
             for rid, spec in zip(batch.req_ids, specs, strict=True)}
    graph.runtime.plan_step(batch, extra, batch.req_ids)
    out = graph.op(*stream)
    rows = batch.query_start_loc[-1]
    graph.watched.append(stream[0][:rows] + stream[1][:rows])  # what monitoring must have seen
    return out, graph.runtime.pop_readouts(batch.req_ids)


def _eager(graph, batch: StepBatch, specs: list[dict | None], stream) -> tuple[torch.Tensor, dict]:
    sae = graph.reg.saes["s"].sae
    resolved = [resolve(RequestSpec.model_validate(s), graph.reg) if s else None for s in specs]
    hidden = stream[0].clone()
    readouts = apply_plan_split_(hidden, stream[1], sae, build_plan([prepare("s", r, sae) for r in resolved],
                                                                    batch.layout()))
    return hidden, {batch.req_ids[i]: acts for i, acts in readouts.items()}


def test_replays_steer_each_step_as_the_eager_path_and_only_the_requests_rows(graph) -> None:
    rng = random.Random(0)
    for step in range(25):
        batch, specs = _step(rng, f"s{step}")
        g = torch.Generator().manual_seed(step)
        stream = (torch.randn(ROWS, D_IN, generator=g).to(DEVICE) * 2, torch.randn(ROWS, D_IN, generator=g).to(DEVICE))
        got, readouts = _run(graph, batch, specs, stream)
        want, want_readouts = _eager(graph, batch, specs, stream)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {step}: {specs}")
        rows = batch.query_start_loc[-1]
        assert torch.equal(got[rows:], stream[0][rows:]), "padding rows must be untouched"
        for rid, acts in want_readouts.items():
            values = torch.tensor(readouts[rid].features["s"].values)
            torch.testing.assert_close(values, acts.values, rtol=1e-5, atol=1e-5)
            assert readouts[rid].features["s"].positions == acts.positions.tolist()
        for i, (rid, spec) in enumerate(zip(batch.req_ids, specs, strict=True)):
            states = readouts[rid].hidden_states
            if spec is None or "return_hidden_states" not in spec:
                assert states == []
                continue
            start, end = batch.query_start_loc[i], batch.query_start_loc[i + 1]
            assert states[0].positions == list(range(batch.computed[i], batch.computed[i] + end - start))
            assert torch.equal(states[0].tensor(), (stream[0][start:end] + stream[1][start:end]).cpu()), \
                f"step {step}: request {i}'s hidden states are not its rows before the edit"
        # The same first request with every neighbour plain: its rows are bit-identical.
        alone = StepBatch([f"{rid}-alone" for rid in batch.req_ids], batch.query_start_loc, batch.computed,
                          batch.prompt_lens)
        solo, _ = _run(graph, alone, [specs[0]] + [None] * (len(specs) - 1), stream)
        first = slice(0, batch.query_start_loc[1])
        assert torch.equal(solo[first], got[first]), f"step {step}: neighbours changed request 0's rows"
    # Monitoring ran inside the graph on every replay, on real rows only, before the edits.
    flush(graph.runtime.watches["s"], graph.runtime.metrics)
    want = CollectorRegistry()
    reference(want, graph.reg.saes["s"].sae, graph.watched)
    got_totals, want_totals = samples(graph.prom), samples(want)
    assert got_totals.keys() == want_totals.keys()
    for key, v in want_totals.items():
        assert abs(got_totals[key] - v) <= 1e-4 * max(1.0, abs(v)), key


def test_an_idle_step_after_a_steered_one_replays_as_a_no_op(graph) -> None:
    rng = random.Random(1)
    batch, _ = _step(rng, "busy")
    clamp = {"steering": {"interventions": [{"sae": "s", "feature": 5, "mode": "clamp", "value": 9.0}]}}
    stream = (torch.randn(ROWS, D_IN).to(DEVICE), torch.randn(ROWS, D_IN).to(DEVICE))
    steered, _ = _run(graph, batch, [clamp] * len(batch.req_ids), stream)
    assert not torch.equal(steered, stream[0])
    idle, _ = _run(graph, StepBatch(["idle"], [0, ROWS - 1], [0], [ROWS - 1]), [None], stream)
    assert torch.equal(idle, stream[0])


@pytest.mark.parametrize(("device", "mode", "replays"), [
    ("cuda", "FULL_AND_PIECEWISE", True), ("cuda", "PIECEWISE", True), ("cuda", "NONE", False), ("cpu", "NONE", False)])
def test_the_v1_runner_takes_the_graph_path_whenever_it_replays_cuda_graphs(device, mode, replays) -> None:
    # A stand-in runner: only its device and vLLM's real compilation config are read (no GPU here).
    config = pytest.importorskip("vllm.config")  # the GPU machines run this file without vLLM
    compilation = config.CompilationConfig(cudagraph_mode=config.CUDAGraphMode[mode])
    runner = SimpleNamespace(device=torch.device(device), vllm_config=SimpleNamespace(compilation_config=compilation))
    assert replays_cuda_graphs(runner) is replays


# --- guardrails on the graph path: trigger lanes, the rule table and gated edits inside the op ---
STOP = 2  # the stop token an abort rule makes the sampler emit


def _rule(rng: random.Random, name: str) -> dict:
    """A random rule: a feature or the probe, k of the last n, any scope, flag / abort / steer."""
    when = rng.choice([{"sae": "s", "feature": rng.choice([3, 11, 40])}, {"probe": "p"}])
    window = rng.choice([1, 2, 3, 5])
    when.update(above={"value": rng.uniform(0.0, 1.5)}, window=window, tokens=rng.randint(1, window),
                positions=rng.choice(["all", "prompt", "generated"]))
    rule = {"name": name, "when": when, "action": rng.choice(["flag", "abort", "steer"])}
    if rule["action"] == "steer":
        rule["steering"] = rng.choice([
            {"interventions": [{"sae": "s", "feature": rng.choice([5, 11]), "mode": "clamp", "value": 6.0}]},
            {"vectors": [{"name": "v", "coefficient": 2.0}]}])
    return rule


def _guard_registry():
    """The test SAE on the device, and a probe ``p`` along its feature 3's decoder row."""
    from sae_serve.sae.registry import LinearProbe

    reg = registry("jumprelu")
    sae = reg.saes["s"].sae.to(DEVICE)
    reg.probes["p"] = LinearProbe("p", "s", (sae.W_dec[3] / sae.W_dec[3].norm()).to(DEVICE), -0.5, False)
    return reg


def _guard_runtime(reg, graph_mode: bool) -> SteeringRuntime:
    from sae_serve.steering.guardrails import GuardTable

    runtime = SteeringRuntime(reg, SECRET, graph_mode=graph_mode, stop_token=STOP)
    if graph_mode:
        runtime.guard_table = GuardTable(DEVICE, 64, growable=False)
        runtime.lanes = 2
        runtime.tables = {"s": FixedTables(reg.saes["s"].sae, Capacity(tokens=ROWS, slots=4, requests=8, lanes=2),
                                           runtime.guard_table, [reg.probes["p"]])}
    return runtime


def test_guardrails_fire_steer_and_stop_on_the_graph_path_as_on_the_eager_one() -> None:
    """Requests with random rules (the probe's and features', k of n over several steps, prefill
    chunks then decodes, a preempted request recomputing rows it was watched on) run through the
    captured op and through the eager segment path: every step's rows, the stops and the positions
    where rules fired must agree."""
    reg = _guard_registry()
    graph_rt, eager_rt = _guard_runtime(reg, True), _guard_runtime(reg, False)
    op = CapturedOp(bind_site(graph_rt, reg.saes["s"]))
    rng = random.Random(7)
    fired_any = set()
    for trial in range(6):
        ids = [f"g{trial}-{i}" for i in range(4)]
        specs = [{"guardrails": [_rule(rng, f"r{i}-{j}") for j in range(rng.randint(1, 2))]} for i in range(3)]
        specs[0]["return_features"] = {"sae": "s", "features": [5, 11]}
        specs[1]["steering"] = {"vectors": [{"name": "v", "coefficient": -1.0}]}  # banked beside its rule's
        specs.append(None)  # a plain neighbour
        extra = {rid: admit(RequestSpec.model_validate(spec), secret=SECRET, key=rid).extra_args if spec else None
                 for rid, spec in zip(ids, specs, strict=True)}
        prompt_lens, computed = [rng.randint(3, 8) for _ in ids], [0] * len(ids)
        for step in range(8):
            lengths = [min(rng.randint(1, 4), p - c) if c < p else 1
                       for p, c in zip(prompt_lens, computed, strict=True)]
            if step == 4:  # request 1 is preempted and recomputes from position 1 (rows it was watched on)
                computed[1], lengths[1] = 1, min(3, computed[1] + lengths[1] - 1)
            qsl = [0]
            for length in lengths:
                qsl.append(qsl[-1] + length)
            batch = StepBatch(ids, qsl, list(computed), prompt_lens)
            g = torch.Generator().manual_seed(100 * trial + step)
            stream = (torch.randn(ROWS, D_IN, generator=g).to(DEVICE) * 2,
                      torch.randn(ROWS, D_IN, generator=g).to(DEVICE))
            graph_rt.plan_step(batch, extra, ids)
            got = op(*stream)
            eager_rt.plan_step(batch, extra, ids)
            want = stream[0].clone()
            eager_rt.apply(reg.saes["s"], want, stream[1])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"trial {trial} step {step}: {specs}")
            sampled = torch.full((len(ids),), 7, device=DEVICE)
            assert graph_rt.force_stops(sampled).tolist() == eager_rt.force_stops(sampled).tolist(), (trial, step)
            computed = [c + n for c, n in zip(computed, lengths, strict=True)]
        got_replies, want_replies = graph_rt.pop_readouts(ids), eager_rt.pop_readouts(ids)
        for rid in ids:
            assert got_replies[rid].guardrails == want_replies[rid].guardrails, (trial, rid, specs)
            fired_any |= {f["action"] for f in got_replies[rid].guardrails}
        graph_rt.plan_step(StepBatch([], [0], [], []), {}, [])  # they leave: their rule rows are freed
        eager_rt.plan_step(StepBatch([], [0], [], []), {}, [])
    assert fired_any == {"flag", "abort", "steer"}  # every action fired somewhere (the test has teeth)


def test_a_request_whose_rules_find_no_row_is_stopped_not_served_unwatched() -> None:
    """The graph path's rule table cannot grow (the graph holds its address): a request that finds
    it full fails closed, stopped at its first token, and its reply says why."""
    from sae_serve.steering.guardrails import GuardTable

    runtime = _guard_runtime(_guard_registry(), True)
    runtime.guard_table = runtime.tables["s"].guards = GuardTable(DEVICE, 2, growable=False)
    rule = {"when": {"sae": "s", "feature": 3, "above": {"value": 99.0}}, "action": "flag"}
    specs = [{"guardrails": [{**rule, "name": f"r{i}"} for i in range(2)]}, {"guardrails": [{**rule, "name": "x"}]}]
    extra = {f"t-{i}": admit(RequestSpec.model_validate(s), secret=SECRET, key=f"t-{i}").extra_args
             for i, s in enumerate(specs)}
    batch = StepBatch(list(extra), [0, 2, 4], [0, 0], [2, 2])
    runtime.plan_step(batch, extra, batch.req_ids)
    assert runtime.force_stops(torch.full((2,), 7, device=DEVICE)).tolist() == [7, STOP]
    replies = runtime.pop_readouts(batch.req_ids)
    assert replies["t-0"].error is None and "guardrail states is in use" in replies["t-1"].error
