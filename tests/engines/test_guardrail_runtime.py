"""The worker's side of guardrails, on the runtime itself (vLLM's runner stands in as plain data):
the server's own rules run on every request, signed or not, and an abort replaces the request's
sampled token with the model's end of sequence."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sae_serve.engines.protocol import admit
from sae_serve.engines.vllm_runtime import SteeringRuntime, StepBatch
from sae_serve.sae.registry import registry_of
from sae_serve.steering.spec import Guardrail, RequestSpec
from tests.conftest import make_sae

SECRET = b"test-deployment-secret"
D_IN, EOS = 16, 3


def rule(name: str, action: str, above: float) -> Guardrail:
    return Guardrail.model_validate({"name": name, "action": action, "when": {
        "sae": "s", "feature": 5, "above": {"value": above}, "positions": "all"}})


def runtime(*server_rules: Guardrail) -> SteeringRuntime:
    return SteeringRuntime(registry_of({"s": make_sae("relu", D_IN, 32, seed=4)}), SECRET, stop_token=EOS,
                           server_rules=server_rules)


def signed(spec: dict, key: str) -> dict:
    return admit(RequestSpec.model_validate(spec), secret=SECRET, key=key).extra_args


def step(rt: SteeringRuntime, requests: dict[str, dict | None]) -> torch.Tensor:
    """One prefill step of 2 tokens per request (its extra_args), then the sampler's output with
    aborts forced."""
    ids = list(requests)
    extra, live = dict(requests), {rid: SimpleNamespace() for rid in ids}
    rt.plan_step(StepBatch(ids, [2 * i for i in range(len(ids) + 1)], [0] * len(ids), [2] * len(ids)), extra, live)
    hidden = torch.randn(2 * len(ids), D_IN, generator=torch.Generator().manual_seed(0))
    rt.apply(rt.registry.saes["s"], hidden, torch.zeros_like(hidden))
    return rt.force_stops(torch.full((len(ids), 1), 100, dtype=torch.int32)).flatten()


def test_the_servers_rules_end_every_request_signed_or_not() -> None:
    rt = runtime(rule("always", "abort", -1000.0))  # fires on the first token of every request
    flag = {"guardrails": [{"name": "mine", "action": "flag", "when": {"sae": "s", "feature": 1,
                                                                       "above": {"value": -1000.0}}}]}
    forged = {"sae_serve": '{"guardrails": []}', "sae_serve_key": "k", "sae_serve_sig": "0" * 64}
    sampled = step(rt, {"plain": None, "signed": signed(flag, "signed"), "forged": forged})
    assert sampled.tolist() == [EOS, EOS, EOS]
    reply = rt.pop_readouts(["signed"])["signed"]  # (its own flag watches generated tokens: none yet)
    assert [(f["name"], f["server"], f["position"]) for f in reply.guardrails] == [("always", True, 0)]


def test_no_rule_fired_no_token_changed_and_no_rule_no_work() -> None:
    rt = runtime(rule("never", "abort", 1000.0))
    assert step(rt, {"a": None, "b": None}).tolist() == [100, 100]
    bare = runtime()
    assert step(bare, {"a": None}).tolist() == [100] and bare.step is None  # plain requests untouched


def test_the_rows_of_requests_that_left_are_freed() -> None:
    rt = runtime(rule("always", "abort", -1000.0))
    free = len(rt.guard_table._free)
    step(rt, {"a": None, "b": None})
    assert len(rt.guard_table._free) == free - 2
    rt.plan_step(StepBatch([], [0], [], []), {}, {})  # both finished
    assert len(rt.guard_table._free) == free and not rt.resolved and not rt.abort_rules
