"""Hidden states on the worker's side, on the runtime itself (vLLM's runner stands in as plain
data): which rows a request's positions pick in each step, that they are copied before the edit
at their layer, how the store bounds and returns them, and what the capabilities refuse."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sae_serve.config import LimitsConfig
from sae_serve.engines.protocol import WorkerCapabilities, admit, cache_salt
from sae_serve.engines.readouts import ReadoutStore
from sae_serve.engines.state_copies import StateBuffers
from sae_serve.engines.vllm_runtime import SteeringRuntime, StepBatch
from sae_serve.errors import SpecError
from sae_serve.sae.registry import registry_of
from sae_serve.steering.fixed import Capacity, FixedTables
from sae_serve.steering.spec import RequestSpec, resolve
from tests.conftest import make_sae

SECRET = b"test-deployment-secret"
D_IN = 16
CLAMP = {"interventions": [{"sae": "s", "feature": 3, "mode": "clamp", "value": 50.0}]}


def runtime(graph: bool = False) -> SteeringRuntime:
    """An SAE at layer 2; layers 1 and 2 exposed. ``graph``: as under CUDA graphs (run eagerly
    here), where the op copies each exposed layer into a buffer and rows are gathered after the step."""
    rt = SteeringRuntime(registry_of({"s": make_sae("relu", D_IN, 32, seed=4, hook_layer=2)}), SECRET,
                         graph_mode=graph, hidden_layers=(1, 2), d_model=D_IN)
    if graph:
        rt.tables = {"s": FixedTables(rt.saes["s"], Capacity(tokens=16, slots=4, requests=8))}
        rt.state_buffers = StateBuffers((1, 2), 16, D_IN, torch.float32, torch.device("cpu"))
    return rt


def signed(spec: dict, key: str) -> dict:
    return admit(RequestSpec.model_validate(spec), secret=SECRET, key=key).extra_args


def forward(rt: SteeringRuntime, batch: StepBatch, extra: dict, seed: int) -> dict[int, torch.Tensor]:
    """One step through layers 1 (exposed only) and 2 (the SAE's); the stream each layer computed."""
    rt.plan_step(batch, extra, {rid: SimpleNamespace() for rid in batch.req_ids})
    gen = torch.Generator().manual_seed(seed)
    streams = {}
    for layer in (1, 2):
        hidden, residual = (torch.randn(batch.query_start_loc[-1], D_IN, generator=gen) for _ in range(2))
        streams[layer] = hidden + residual
        rt.apply(rt.registry.saes["s"] if layer == 2 else None, hidden, residual, layer)
    return streams


def states(rt: SteeringRuntime, key: str) -> dict[int, tuple[list[int], torch.Tensor]]:
    reply = rt.pop_readouts([key])[key]
    assert reply.error is None, reply.error
    return {h.layer: (h.positions, h.tensor()) for h in reply.hidden_states}


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_each_request_gets_its_own_positions_before_the_edit_at_the_layer(graph: bool) -> None:
    rt = runtime(graph)
    reads_all = signed({"steering": CLAMP, "return_hidden_states": {"layers": [1, 2], "positions": "all"}}, "all")
    reads_last = signed({"return_hidden_states": {"layers": [2], "dtype": "float16"}}, "last")
    # Prefill: "all" has 3 prompt tokens (rows 0-2), "last" 4 (rows 3-6), a plain request 2 (rows 7-8).
    prefill = StepBatch(["all", "last", "plain"], [0, 3, 7, 9], [0, 0, 0], [3, 4, 2])
    streams = forward(rt, prefill, {"all": reads_all, "last": reads_last, "plain": None}, seed=0)
    got = states(rt, "all")
    assert got[1][0] == [0, 1, 2] and torch.equal(got[1][1], streams[1][0:3])
    assert got[2][0] == [0, 1, 2] and torch.equal(got[2][1], streams[2][0:3])  # as computed: the clamp came after
    last = states(rt, "last")
    assert list(last) == [2] and last[2][0] == [3] and last[2][1].dtype == torch.float16
    assert torch.equal(last[2][1], streams[2][6:7].half())
    # A decode step: each request's one new token; "last" has nothing left to read.
    decode = StepBatch(["all", "last", "plain"], [0, 1, 2, 3], [3, 4, 2], [3, 4, 2])
    streams = forward(rt, decode, {"all": reads_all, "last": reads_last, "plain": None}, seed=1)
    got = states(rt, "all")
    assert got[1][0] == got[2][0] == [3] and torch.equal(got[1][1], streams[1][0:1])
    assert states(rt, "last") == {}


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_listed_positions_pick_across_steps_and_a_recomputed_position_replaces_its_rows(graph: bool) -> None:
    rt = runtime(graph)
    extra = signed({"return_hidden_states": {"layers": [1], "positions": [1, 4]}}, "k")
    first = forward(rt, StepBatch(["r"], [0, 3], [0], [3]), {"r": extra}, seed=0)  # positions 0-2
    forward(rt, StepBatch(["r"], [0, 1], [3], [3]), {"r": extra}, seed=1)  # position 3
    streams = forward(rt, StepBatch(["r"], [0, 1], [4], [3]), {"r": extra}, seed=2)  # position 4
    got = states(rt, "k")[1]  # (graph mode: step 0's row was gathered before step 1 overwrote the buffer)
    assert got[0] == [1, 4] and torch.equal(got[1][0], first[1][1]) and torch.equal(got[1][1], streams[1][0])
    # Preempted and recomputed from position 0: the new rows replace the old ones.
    forward(rt, StepBatch(["r"], [0, 2], [3], [3]), {"r": extra}, seed=3)  # positions 3-4 again
    streams = forward(rt, StepBatch(["r"], [0, 5], [0], [3]), {"r": extra}, seed=4)  # 0-4 again
    got = states(rt, "k")[1]
    assert got[0] == [1, 4] and torch.equal(got[1], streams[1][[1, 4]])


def test_rows_that_land_after_their_request_left_expire_with_it() -> None:
    """On a GPU a copy may land a step after its request left the runner (under graphs a request's
    last rows are always gathered then). Nobody may fetch them (a client that hung up): they must
    expire all the same. Here the copy starts once the request has left, as a late one lands."""
    rt = runtime()
    now = [0.0]
    rt.readouts = ReadoutStore(1000, ttl_s=30.0, clock=lambda: now[0])
    extra = signed({"return_hidden_states": {"layers": [1], "positions": "all"}}, "k")
    forward(rt, StepBatch(["r"], [0, 3], [0], [3]), {"r": extra}, seed=0)
    rt.pop_readouts(["k"])  # fetched while live (a hang-up discards it so)
    rt.plan_step(StepBatch([], [0], [], []), {}, {})  # it has left the runner
    rt.copies.start(1, torch.zeros(1, D_IN), [("k", torch.tensor([3]), torch.float32)])  # its last row lands
    rt.plan_step(StepBatch([], [0], [], []), {}, {})
    now[0] = 31.0
    rt.plan_step(StepBatch([], [0], [], []), {}, {})
    assert len(rt.readouts) == 0


def test_float16_states_that_would_overflow_fail_the_request_instead_of_turning_inf() -> None:
    rt = runtime()
    extra = signed({"return_hidden_states": {"layers": [1], "dtype": "float16"}}, "k")
    rt.plan_step(StepBatch(["r"], [0, 2], [0], [2]), {"r": extra}, {"r": None})
    big = torch.zeros(2, D_IN)
    big[1, 5] = 70_000.0  # a massive activation: above float16's 65,504
    rt.apply(None, big, torch.zeros(2, D_IN), 1)
    reply = rt.pop_readouts(["k"])["k"]
    assert reply.hidden_states == [] and "float16" in reply.error and "float32" in reply.error


def test_the_store_fails_a_request_past_its_byte_limit() -> None:
    store = ReadoutStore(100, 30.0, max_state_bytes=64)
    store.add_states("k", 3, torch.tensor([0]), torch.zeros(1, 8))  # 32 bytes
    store.add_states("k", 3, torch.tensor([1]), torch.zeros(1, 8))  # 64
    assert store.nbytes == 64
    store.add_states("k", 3, torch.tensor([2]), torch.zeros(1, 8))  # 96: over
    reply = store.pop("k")
    assert reply.hidden_states == [] and "limits.max_hidden_state_bytes" in reply.error


def capabilities(**changes) -> WorkerCapabilities:
    return WorkerCapabilities(**{"graph_mode": False, "slots": 16, "max_model_len": 1000, "hidden_layers": (1, 2),
                                 "d_model": 64, **changes})


def check(caps: WorkerCapabilities, hidden: dict, limits: LimitsConfig | None = None) -> None:
    registry = registry_of({"s": make_sae("relu", D_IN, 32, seed=4, hook_layer=2)})
    request = resolve(RequestSpec.model_validate({"return_hidden_states": hidden}), registry)
    caps.check(request, limits or LimitsConfig())


def test_capabilities_refuse_naming_the_field() -> None:
    check(capabilities(), {"layers": [1, 2], "positions": "all"})
    with pytest.raises(SpecError) as err:
        check(capabilities(), {"layers": [1, 5]})
    assert err.value.field == "return_hidden_states.layers[1]" and "exposed: [1, 2]" in str(err.value)
    # 2 layers x 1000 positions x 64 x 4 bytes = 512,000 bytes
    with pytest.raises(SpecError) as err:
        check(capabilities(), {"layers": [1, 2], "positions": "all"}, LimitsConfig(max_hidden_state_bytes=500_000))
    assert err.value.field == "return_hidden_states" and "512000 bytes" in str(err.value)
    check(capabilities(), {"layers": [1, 2], "positions": "all", "dtype": "float16"},
          LimitsConfig(max_hidden_state_bytes=500_000))  # half the bytes fit
    check(capabilities(graph_mode=True), {"layers": [1], "positions": "all"})  # CUDA graphs: copied from buffers
    with pytest.raises(SpecError) as err:
        check(capabilities(speculative=True), {"layers": [1]})
    assert err.value.field == "return_hidden_states" and "speculative" in str(err.value)


@pytest.mark.parametrize("bad", [{"layers": []}, {"layers": [1, 1]}, {"layers": [1], "positions": "first"},
                                 {"layers": [1], "positions": [2, 2]}, {"layers": [1], "positions": [-1]},
                                 {"layers": [1], "dtype": "bfloat16"}, {"layers": [-1]}])
def test_the_schema_refuses(bad: dict) -> None:
    with pytest.raises(ValueError):
        RequestSpec.model_validate({"return_hidden_states": bad})


def test_a_request_reading_states_computes_its_prompt() -> None:
    spec = RequestSpec.model_validate({"return_hidden_states": {"layers": [1]}})
    salts = {cache_salt(SECRET, spec, spec.model_dump_json(), None) for _ in range(2)}
    assert len(salts) == 2 and None not in salts  # unique: never served from another request's cached KV


def test_positions_past_the_context_are_refused() -> None:
    with pytest.raises(SpecError) as err:
        check(capabilities(), {"layers": [1], "positions": [5, 1000]})  # max_model_len 1000
    assert err.value.field == "return_hidden_states.positions" and "1000" in str(err.value)
    with pytest.raises(ValueError):  # a bool is not a layer
        RequestSpec.model_validate({"return_hidden_states": {"layers": [True]}})


def test_a_stream_never_gets_a_position_twice_after_a_preemption(tmp_path) -> None:
    """The service drops states of positions it already sent (a preempted request computes them
    again). The workers stand in as their replies: preempting a real vLLM request on purpose is
    not something a test can schedule."""
    import asyncio

    from sae_serve.config import SaeServeConfig
    from sae_serve.engines.protocol import HiddenStates, WorkerReply
    from sae_serve.sae.formats import save_sae
    from sae_serve.sae.registry import SaeEntry
    from sae_serve.server.service import SteeringService

    save_sae(make_sae("relu", D_IN, 32, seed=4, hook_layer=2), tmp_path / "s")
    service = SteeringService(SaeServeConfig(saes=(SaeEntry(name="s", path=str(tmp_path / "s")),)))
    asked = {"return_hidden_states": {"layers": [2], "positions": "all"}}
    prepared = service.prepare(RequestSpec.model_validate(asked))

    def states(positions: list[int]) -> HiddenStates:
        rows = torch.tensor([[float(p)] * D_IN for p in positions])
        return HiddenStates(2, positions, "float32", list(rows.shape), rows.numpy().tobytes())

    replies = [WorkerReply(hidden_states=[states([0, 1, 2])]),  # streamed
               WorkerReply(hidden_states=[states([0, 1, 2, 3])])]  # preempted: 0-2 computed again

    class Workers:
        async def collective_rpc(self, method: str, args: tuple) -> list[dict]:
            return [{args[0][0]: replies.pop(0).to_wire()}]

    first, second = (asyncio.run(service.collect(Workers(), prepared)) for _ in range(2))
    assert first.hidden_states[0].positions == [0, 1, 2]
    [again] = second.hidden_states
    assert again.positions == [3] and again.shape == [1, D_IN]
    assert torch.equal(again.tensor(), torch.full((1, D_IN), 3.0))


def test_a_server_refuses_a_config_that_stops_the_model_early(tmp_path) -> None:
    from sae_serve.config import HiddenStatesConfig, SaeServeConfig
    from sae_serve.errors import SaeServeError
    from sae_serve.server.service import SteeringService

    with pytest.raises(SaeServeError, match="hidden_states.stop_after"):
        SteeringService(SaeServeConfig(hidden_states=HiddenStatesConfig(layers=(2,), stop_after=2)))


def test_exposed_layers_under_graphs_are_the_configs_and_stop_after_must_come_after_them() -> None:
    from sae_serve.config import HiddenStatesConfig, SaeServeConfig
    from sae_serve.engines.vllm_site import _exposed_layers
    from sae_serve.errors import SaeServeError

    config = SaeServeConfig(hidden_states=HiddenStatesConfig(layers=(3,)))
    assert _exposed_layers(config, {"s": 5}, 8, range(8), graph_mode=False) == (3, 5)
    assert _exposed_layers(config, {"s": 5}, 8, range(8), graph_mode=True) == (3,)  # a copy per step each
    assert _exposed_layers(config, {"s": 5}, 8, range(4), graph_mode=False) == (3,)  # a pipeline stage's own
    stopped = SaeServeConfig(hidden_states=HiddenStatesConfig(layers=(3,), stop_after=4))
    with pytest.raises(SaeServeError, match="stop_after"):
        _exposed_layers(stopped, {"s": 5}, 8, range(8), graph_mode=True)
    assert _exposed_layers(stopped, {}, 8, range(8), graph_mode=False) == (3,)
