"""The V2-runner adapter (GPU-only in vLLM) on the CPU, with vLLM's real InputBatch (its
``make_dummy`` too) and NewRequestData. vLLM's ModelState is stood in for by a recorder (it needs the
model, and the runner itself needs a GPU and Triton; bench/gpu_check.py runs the real one). What
runs is ours: the adapter, the runtime in graph mode and the fixed-shape op."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_serve.engines.protocol import SPEC_KEY, admit
from sae_serve.engines.vllm_runtime import SteeringRuntime
from sae_serve.engines.vllm_v2 import SteeringModelState
from sae_serve.sae.registry import registry_of
from sae_serve.steering.fixed import Capacity, FixedTables
from sae_serve.steering.hook import apply_plan_split_
from sae_serve.steering.plan import RequestRows
from sae_serve.steering.spec import RequestSpec
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


SECRET = b"test-deployment-secret"


def _new(req_id: str, spec: dict | None, prompt: int, extra: dict | None = None, embeds: bool = False):
    """vLLM's NewRequestData for a request the service admitted (or a plain one)."""
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData

    if spec:
        extra = admit(RequestSpec.model_validate(spec), secret=SECRET, key=f"key-{req_id}").extra_args
    return NewRequestData(req_id=req_id, prompt_token_ids=None if embeds else list(range(prompt)), mm_features=[],
                          sampling_params=SamplingParams(extra_args=extra), pooling_params=None, block_ids=([],),
                          num_computed_tokens=0, lora_request=None,
                          prompt_embeds=torch.zeros(prompt, D_IN) if embeds else None)


def _batch(req_ids: list[str], qsl: list[int], computed: list[int]) -> SimpleNamespace:
    return SimpleNamespace(num_reqs=len(req_ids), req_ids=req_ids, query_start_loc_np=np.array(qsl),
                           num_computed_tokens_np=np.array(computed))


def _runtime() -> tuple[SteeringRuntime, object]:
    registry = registry_of({"s": make_sae("jumprelu", D_IN, 64, seed=4)})
    runtime = SteeringRuntime(registry, SECRET, graph_mode=True)
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
    [plan] = runtime.resolved["a"].plans.values()  # graph mode: no per-request encoder or decoder slices
    assert plan.subset is None and plan.w_dec.numel() == 0
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
    assert out.error is None and out.features["s"].positions == [0, 1, 2, 3]
    assert out.features["s"].indices[0] == [3, 7]


def test_a_decode_step_after_prefill_maps_positions_and_removal_forgets() -> None:
    runtime, registry = _runtime()
    state = SteeringModelState(InnerState(), runtime)
    state.add_request(0, _new("a", CLAMP, prompt=4))
    state.prepare_inputs(_batch(["a"], [0, 4], [0]), None)
    runtime.apply(registry.saes["s"], torch.zeros(4, D_IN), torch.ones(4, D_IN))
    state.prepare_inputs(_batch(["a"], [0, 1], [4]), None)  # one generated token at position 4
    runtime.apply(registry.saes["s"], torch.zeros(1, D_IN), torch.ones(1, D_IN))
    positions = runtime.pop_readouts(["key-a"])["key-a"].features["s"].positions
    assert positions == [0, 1, 2, 3, 4]
    state.remove_request("a")
    state.prepare_inputs(_batch([], [0], []), None)
    assert runtime.resolved == {} and not runtime.tables["s"].filled


def test_what_graphs_cannot_run_is_reported_not_silently_dropped() -> None:
    runtime, _ = _runtime()
    state = SteeringModelState(InnerState(), runtime)
    state.add_request(0, _new("a", {"return_features": {"sae": "s", "top_k": 3}}, prompt=2))
    state.prepare_inputs(_batch(["a"], [0, 2], [0]), None)
    error = runtime.pop_readouts(["key-a"])["key-a"].error
    assert "CUDA graphs cannot run" in error and "top-k" in error
    assert runtime.metrics.rejected_specs.labels("unrunnable")._value.get() >= 1


def test_vllms_dummy_batches_pass_through_idle_before_and_between_real_requests() -> None:
    """vLLM's V2 runner calls prepare_inputs for its profile, warm-up and capture batches too, with
    request ids (``InputBatch.make_dummy``) that never went through add_request."""
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    runtime, registry = _runtime()
    state = SteeringModelState(InnerState(), runtime)
    buffers = InputBuffers(max_num_reqs=4, max_num_tokens=16, device=torch.device("cpu"))
    stream = torch.randn(8, D_IN), torch.randn(8, D_IN)
    for num_reqs, num_tokens in ((4, 16), (1, 1), (2, 8)):  # profile, decode capture, mixed capture
        state.prepare_inputs(InputBatch.make_dummy(num_reqs, num_tokens, buffers), None)
        assert not runtime.tables["s"].filled
        hidden = stream[0].clone()
        runtime.apply(registry.saes["s"], hidden, stream[1])
        assert torch.equal(hidden, stream[0])  # the dummy step is a no-op
    state.add_request(0, _new("a", CLAMP, prompt=4))
    state.prepare_inputs(_batch(["a"], [0, 4], [0]), None)
    assert runtime.tables["s"].filled
    runtime.apply(registry.saes["s"], stream[0][:4].clone(), stream[1][:4])
    state.prepare_inputs(InputBatch.make_dummy(2, 2, buffers), None)  # a dummy between real steps
    assert not runtime.tables["s"].filled and set(runtime.resolved) == {"a"}
    assert runtime.pop_readouts(["key-a"])["key-a"].features["s"].positions == [0, 1, 2, 3]


def test_prompt_embeds_requests_take_their_prompt_length_from_vllm() -> None:
    runtime, _ = _runtime()
    state = SteeringModelState(InnerState(), runtime)
    state.add_request(0, _new("e", CLAMP, prompt=5, embeds=True))
    assert state._prompt_lens["e"] == 5


@pytest.mark.parametrize("extra", [
    {SPEC_KEY: '{"steering": {"interventions": [{"sae": "s", "feature": 3, "mode": "clamp", "value": 500}]}}',
     "sae_serve_key": "x"},
    {SPEC_KEY: '{"steering": {"interventions": [{"sae": "s", "feature": 3, "mode": "clamp", "value": 500}]}}',
     "sae_serve_key": "x", "sae_serve_sig": "0" * 64},
    {"sae_serve_sig": "forged"},
])
def test_a_spec_the_service_did_not_sign_is_ignored_and_counted(extra: dict) -> None:
    runtime, registry = _runtime()
    state = SteeringModelState(InnerState(), runtime)
    before = runtime.metrics.rejected_specs.labels("unauthenticated")._value.get()
    state.add_request(0, _new("m", None, prompt=4, extra=extra))
    state.prepare_inputs(_batch(["m"], [0, 4], [0]), None)
    assert not runtime.tables["s"].filled  # nothing to steer
    hidden, residual = torch.randn(4, D_IN), torch.randn(4, D_IN)
    got = hidden.clone()
    runtime.apply(registry.saes["s"], got, residual)
    assert torch.equal(got, hidden)
    assert runtime.metrics.rejected_specs.labels("unauthenticated")._value.get() == before + 1
    assert len(runtime.readouts) == 0  # nothing kept for it


def test_v2s_sample_emits_the_stop_token_for_requests_an_abort_rule_stopped() -> None:
    """V2's `sample` is wrapped like V1's sampler: rows (in the batch order prepare_inputs planned)
    of requests whose abort rule fired get the stop token; the others keep what was sampled."""
    from vllm.v1.worker.gpu.sample.output import SamplerOutput

    from sae_serve.engines.vllm_v2 import stop_aborted_requests
    from sae_serve.steering.guardrails import GuardTable
    from sae_serve.steering.spec import ResolvedGuardrail

    runtime = SteeringRuntime(registry_of({"s": make_sae("relu", D_IN, 64)}), stop_token=2)
    table = GuardTable("cpu")
    rule = ResolvedGuardrail("r", "abort", "s", 0, None, 1.0, 1, 1, "generated", {}, {}, (), False)
    fired, waiting = table.allocate(rule), table.allocate(rule)
    table.fired[fired.slot] = 5
    runtime.guard_table, runtime.aborts = table, [(1, [fired]), (2, [waiting])]
    sampled = torch.tensor([[7], [8], [9]], dtype=torch.int32)
    out = SamplerOutput(sampled, None, None, torch.ones(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    runner = SimpleNamespace(_sae_serve=runtime)
    got, _, _ = stop_aborted_requests(lambda self, *a: (out, out.num_sampled, out.num_rejected))(runner)
    assert got.sampled_token_ids.tolist() == [[7], [2], [9]] and got.sampled_token_ids.dtype == torch.int32
    runtime.aborts = []  # a step without abort rules passes through untouched
    assert stop_aborted_requests(lambda self, *a: (out, 1, 0))(runner)[0] is out
