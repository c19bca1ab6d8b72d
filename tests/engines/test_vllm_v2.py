"""The V2-runner adapter (GPU-only in vLLM) on the CPU: vLLM's V2 ModelState, InputBatch and
NewRequestData are stood in for by plain objects with the same fields (the runner itself needs a
GPU and Triton; bench/gpu_check.py runs the real one). What runs is ours: the adapter, the
runtime in graph mode and the fixed-shape op."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from sae_serve.engines.vllm_plugin import REQUEST_KEY, SPEC_KEY, SteeringRuntime
from sae_serve.engines.vllm_v2 import SteeringModelState
from sae_serve.sae.registry import registry_of
from sae_serve.steering.fixed import Capacity, FixedTables
from sae_serve.steering.hook import apply_plan_split_
from sae_serve.steering.plan import RequestRows
from tests.conftest import make_sae
from tests.steering.test_hook import D_IN, plan_for, request


class InnerState:
    """Stands in for vLLM's DefaultModelState: records what reaches it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.supports_mm_inputs = False

    def add_request(self, req_index, data) -> None:
        self.calls.append(f"add {data.req_id}")

    def remove_request(self, req_id) -> None:
        self.calls.append(f"remove {req_id}")

    def prepare_inputs(self, input_batch, req_states) -> dict:
        self.calls.append("prepare")
        return {"positions": "vllm's"}


def _new(req_id: str, spec: dict | None, prompt: int) -> SimpleNamespace:
    extra = {SPEC_KEY: json.dumps(spec), REQUEST_KEY: f"key-{req_id}"} if spec else None
    return SimpleNamespace(req_id=req_id, sampling_params=SimpleNamespace(extra_args=extra),
                           prompt_token_ids=list(range(prompt)))


def _batch(req_ids: list[str], qsl: list[int], computed: list[int]) -> SimpleNamespace:
    return SimpleNamespace(num_reqs=len(req_ids), req_ids=req_ids, query_start_loc_np=np.array(qsl),
                           num_computed_tokens_np=np.array(computed))


def _runtime() -> tuple[SteeringRuntime, object]:
    registry = registry_of({"s": make_sae("jumprelu", D_IN, 64, seed=4)})
    runtime = SteeringRuntime(registry, graph_mode=True)
    runtime.tables = {"s": FixedTables(registry.saes["s"].sae, Capacity(tokens=16, slots=4, requests=4))}
    return runtime, registry


CLAMP = {"steering": {"interventions": [{"sae": "s", "feature": 3, "mode": "clamp", "value": 5.0}]},
         "return_features": {"sae": "s", "features": [3, 7]}}


def test_prepare_inputs_plans_the_step_and_the_graph_op_steers_only_its_rows() -> None:
    runtime, registry = _runtime()
    inner = InnerState()
    state = SteeringModelState(inner, runtime)
    state.add_request(0, _new("a", CLAMP, prompt=4))
    state.add_request(1, _new("b", None, prompt=3))
    assert state.prepare_inputs(_batch(["a", "b"], [0, 4, 7], [0, 0]), None) == {"positions": "vllm's"}
    assert inner.calls == ["add a", "add b", "prepare"] and state.supports_mm_inputs is False
    state._mamba_ctx = None  # vLLM resets attributes on its state: they must reach it
    assert inner._mamba_ctx is None and "_mamba_ctx" not in vars(state)
    sae = registry.saes["s"].sae
    g = torch.Generator().manual_seed(0)
    hidden, residual = torch.randn(8, D_IN, generator=g), torch.randn(8, D_IN, generator=g)  # row 7: padding
    got = hidden.clone()
    runtime.apply(registry.saes["s"], got, residual)  # what a graph replay runs
    want = hidden.clone()
    reference = plan_for(registry, [request(registry, [{"feature": 3, "mode": "clamp", "value": 5.0}],
                                            readout={"features": [3, 7]}), None],
                         [RequestRows(0, 4, 0, 4), RequestRows(4, 7, 0, 3)])
    apply_plan_split_(want, residual, sae, reference)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[4:], hidden[4:])
    out = runtime.pop_readouts(["key-a"])["key-a"]
    assert out["error"] is None and out["features"]["s"]["positions"] == [0, 1, 2, 3]
    assert out["features"]["s"]["indices"][0] == [3, 7]


def test_a_decode_step_after_prefill_maps_positions_and_removal_forgets() -> None:
    runtime, registry = _runtime()
    state = SteeringModelState(InnerState(), runtime)
    state.add_request(0, _new("a", CLAMP, prompt=4))
    state.prepare_inputs(_batch(["a"], [0, 4], [0]), None)
    runtime.apply(registry.saes["s"], torch.zeros(4, D_IN), torch.ones(4, D_IN))
    state.prepare_inputs(_batch(["a"], [0, 1], [4]), None)  # one generated token at position 4
    runtime.apply(registry.saes["s"], torch.zeros(1, D_IN), torch.ones(1, D_IN))
    positions = runtime.pop_readouts(["key-a"])["key-a"]["features"]["s"]["positions"]
    assert positions == [0, 1, 2, 3, 4]
    state.remove_request("a")
    state.prepare_inputs(_batch([], [0], []), None)
    assert runtime.resolved == {} and not runtime.tables["s"].filled


def test_what_graphs_cannot_run_is_reported_not_silently_dropped() -> None:
    runtime, _ = _runtime()
    state = SteeringModelState(InnerState(), runtime)
    state.add_request(0, _new("a", {"return_features": {"sae": "s", "top_k": 3}}, prompt=2))
    state.prepare_inputs(_batch(["a"], [0, 2], [0]), None)
    error = runtime.pop_readouts(["key-a"])["key-a"]["error"]
    assert "CUDA graphs cannot run" in error and "top-k" in error
