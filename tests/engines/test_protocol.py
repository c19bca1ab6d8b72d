"""The API-process / worker boundary: what admits a spec, the cache salts, the wire records, and
the bounded readout store."""

from __future__ import annotations

import hashlib

import pytest
import torch

from sae_serve.engines.protocol import (
    REQUEST_KEY,
    SIGNATURE_KEY,
    SPEC_KEY,
    UnauthenticatedSpec,
    WorkerCapabilities,
    WorkerReply,
    admit,
    admitted_spec,
    merge_replies,
    secret_id,
)
from sae_serve.engines.readouts import ReadoutStore
from sae_serve.errors import SaeServeError
from sae_serve.steering.hook import FeatureActivations
from sae_serve.steering.spec import RequestSpec

SECRET = b"deployment-a"
STEER = RequestSpec.model_validate(
    {"steering": {"interventions": [{"sae": "s", "feature": 3, "mode": "clamp", "value": 5.0}]}})
READ = RequestSpec.model_validate({"return_features": {"sae": "s", "top_k": 2}})


def test_only_the_services_signature_admits_a_spec() -> None:
    req = admit(STEER, secret=SECRET)
    assert admitted_spec(req.extra_args, SECRET) == (req.key, req.spec_json)
    assert admitted_spec({"temperature_hint": 1}, SECRET) is None  # not ours: a plain request
    forged = [
        {SPEC_KEY: req.spec_json, REQUEST_KEY: req.key},  # no signature
        {**req.extra_args, SPEC_KEY: req.spec_json.replace("5.0", "500.0")},  # a stronger spec, same signature
        {**req.extra_args, REQUEST_KEY: "someone-else"},  # another key, to read another's readout
        {**req.extra_args, "sae_serve_extra": "x"},  # an unknown field of ours
        {SIGNATURE_KEY: req.signature},
        {**req.extra_args, SPEC_KEY: {"steering": {}}},  # not a string
    ]
    for extra in forged:
        with pytest.raises(UnauthenticatedSpec):
            admitted_spec(extra, SECRET)
    with pytest.raises(UnauthenticatedSpec):  # another deployment's secret
        admitted_spec(req.extra_args, b"deployment-b")
    with pytest.raises(UnauthenticatedSpec):  # a worker without a secret admits nothing
        admitted_spec(req.extra_args, None)


def test_cache_salts_are_keyed_and_keep_the_clients_tenant() -> None:
    a, b = admit(STEER, secret=SECRET), admit(STEER, secret=SECRET)
    assert a.cache_salt == b.cache_salt  # prompts steered alike share blocks
    spec_hash = hashlib.sha256(STEER.model_dump_json().encode()).hexdigest()[:32]
    assert a.cache_salt != spec_hash  # no client can compute it
    assert admit(STEER, secret=b"other").cache_salt != a.cache_salt
    tenant_1, tenant_2 = admit(STEER, "tenant-1", SECRET), admit(STEER, "tenant-2", SECRET)
    assert len({a.cache_salt, tenant_1.cache_salt, tenant_2.cache_salt}) == 3
    assert admit(RequestSpec(), "tenant-1", SECRET).cache_salt == "tenant-1"  # plain: the client's own
    assert admit(READ, secret=SECRET).cache_salt != admit(READ, secret=SECRET).cache_salt  # readers: never shared
    prompt_only = RequestSpec.model_validate({"steering": {**STEER.steering.model_dump(), "positions": "prompt"}})
    assert admit(prompt_only, secret=SECRET).cache_salt != admit(prompt_only, secret=SECRET).cache_salt


def test_wire_records_round_trip_and_merge_across_ranks() -> None:
    sid = secret_id(SECRET)
    caps = WorkerCapabilities.from_workers([
        {"graph_mode": False, "slots": 16, "max_model_len": 4096, "secret_id": sid}, None,
        {"graph_mode": True, "slots": 8, "max_model_len": 2048, "secret_id": sid}])
    assert caps == WorkerCapabilities(True, 8, 2048, sid)  # the strictest rank rules
    assert WorkerCapabilities.from_workers([None, None]) is None
    same = {"graph_mode": False, "slots": 16, "max_model_len": 4096, "secret_id": secret_id(SECRET)}
    assert WorkerCapabilities.from_workers([same, same]).secret_id == secret_id(SECRET)
    for other in (None, secret_id(b"deployment-b")):  # a worker without the secret, or with another
        with pytest.raises(SaeServeError, match="do not share one SAE_SERVE_SECRET"):
            WorkerCapabilities.from_workers([same, {**same, "secret_id": other}])
    store = ReadoutStore(max_values=100, ttl_s=10)
    store.add("k", "s", FeatureActivations(torch.tensor([0, 1]), torch.tensor([[3], [4]]), torch.tensor([[.5], [.25]])))
    store.add_states("k", 2, torch.tensor([1]), torch.ones(1, 3))
    reply = store.pop("k")
    wire = reply.to_wire()
    assert WorkerReply.from_wire(wire) == reply and WorkerReply.from_wire(wire).features["s"].values == [[0.5], [0.25]]
    assert wire["hidden_states"][0]["shape"] == [1, 3] and wire["features"]["s"]["positions"] == [0, 1]
    merged = merge_replies([{"k": wire}, {"k": WorkerReply().to_wire()}, {}], ["k", "absent"])
    assert merged["k"].features["s"].positions == [0, 1] and merged["absent"] == WorkerReply()


def _acts(rows: int, k: int = 4, start: int = 0, value: float = 0.0) -> FeatureActivations:
    return FeatureActivations(torch.arange(start, start + rows), torch.zeros(rows, k, dtype=torch.long),
                              torch.full((rows, k), value))


def test_the_readout_store_bounds_each_request_and_drops_the_unfetched() -> None:
    now = [0.0]
    store = ReadoutStore(max_values=40, ttl_s=5, clock=lambda: now[0])
    store.add("a", "s", _acts(8))  # 32 values
    store.add("a", "s", _acts(3, start=8))  # 12 more: over 40
    reply = store.pop("a")
    assert "limit of 40 values" in reply.error and reply.features == {}  # never a silently short readout
    for i in range(500):  # requests that were aborted, or whose client never fetched
        store.add(f"gone-{i}", "s", _acts(2))
        store.finish(f"gone-{i}")
    store.add("live", "s", _acts(2))
    assert len(store) == 501 and store.nbytes > 0
    now[0] = 6.0
    store.expire()
    assert len(store) == 1 and store.pop("live").features["s"].positions == [0, 1]
    assert store.nbytes == 0


def test_positions_computed_again_replace_the_earlier_rows() -> None:
    """A preempted request recomputes its tokens: its readout holds each position once, the newest."""
    store = ReadoutStore(max_values=100, ttl_s=5)
    store.add("k", "s", _acts(6, k=1, value=1.0))  # positions 0..5
    store.add("k", "s", _acts(4, k=1, start=3, value=2.0))  # recomputed from position 3: 3..6
    assert store.nbytes == 7 * (8 + 4 + 8)  # positions int64, indices int64, values float32
    reply = store.pop("k").features["s"]
    assert reply.positions == list(range(7)) and reply.values == [[1.0]] * 3 + [[2.0]] * 4
    full = ReadoutStore(max_values=6, ttl_s=5)  # at the limit, a recomputation still fits
    full.add("k", "s", _acts(6, k=1))
    full.add("k", "s", _acts(6, k=1, value=3.0))
    assert full.pop("k").features["s"].values == [[3.0]] * 6


@pytest.mark.parametrize(("fired", "finish", "stop_reason", "aborted"), [
    (True, "stop", None, True),  # the tokenizer's EOS is the one the workers emit
    (True, "stop", 128001, True),  # Llama 3: the workers emit the config's first EOS, vLLM names it a stop token
    (True, "length", None, True),  # under ignore_eos the emitted EOS does not end it; max_tokens does
    (True, "stop", 128009, False),  # another of the client's or the model's stop tokens ended it
    (True, "stop", "###", False),  # a stop string
    (False, "stop", 128001, False),  # no abort fired: the model's own end
])
def test_an_abort_is_told_from_the_models_own_end(fired: bool, finish: str, stop_reason: object,
                                                   aborted: bool) -> None:
    workers = WorkerCapabilities(graph_mode=False, slots=8, max_model_len=1024, stop_token=128001)
    assert workers.ended_by_guardrail(fired, finish, stop_reason) is aborted
