"""Guardrails through `sae-serve serve`: a request's own rules and the server's, over HTTP (plain
and streaming) and gRPC. The server watches with a probe planted along the shipped SAE's French
feature, and its own rule aborts any request whose generated text turns military."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from sae_serve.config import MetricsConfig, SaeServeConfig, write_config
from sae_serve.data import DEFAULT_SAE_DIR
from sae_serve.sae.registry import ProbeEntry, SaeEntry
from sae_serve.steering.policy import Policy
from sae_serve.steering.spec import Guardrail
from tests.conftest import plant_french_probe
from tests.server.harness import AUTH, Server, WithApiKey, metric, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]

NO_WAR = Guardrail.model_validate({"name": "no-war", "action": "abort", "when": {
    "sae": "layer15", "feature": "military", "above": {"multiple_of_max": 0.2}}})
FRENCH = {"probe": "french", "above": {"value": 0.0}}
PROMPT = "The capital of France is Paris. In French, hello is"
WAR = "The army marched to the front. The soldiers"  # its continuation is military: the server's rule fires


@pytest.fixture(scope="module")
def guarded(default_model_dir, tmp_path_factory) -> Server:
    folder = tmp_path_factory.mktemp("guarded")
    plant_french_probe(folder / "french.safetensors")
    config = SaeServeConfig(saes=(SaeEntry(name="layer15", path=str(DEFAULT_SAE_DIR)),),
                            probes=(ProbeEntry(name="french", layer=15, path=str(folder / "french.safetensors")),),
                            guardrails=(NO_WAR,), metrics=MetricsConfig(enabled=True),
                            policy=Policy(guardrail_actions=("abort", "flag")))
    running = start_server(write_config(config, folder / "config.json"), folder)
    yield running
    running.stop()


def complete(server: Server, **extra) -> httpx.Response:
    model = httpx.get(server.base + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **extra}
    return httpx.post(server.base + "/v1/completions", json=body, headers=AUTH, timeout=120)


def stream(server: Server, **extra) -> list[dict]:
    model = httpx.get(server.base + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True, **extra}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def rule(action: str, when: dict = FRENCH) -> dict:
    return {"guardrails": [{"name": f"my-{action}", "when": when, "action": action}]}


def test_abort_ends_at_the_firing_token_in_http_streaming_and_grpc(guarded) -> None:
    plain = complete(guarded).json()["choices"][0]
    flagged = complete(guarded, **rule("flag")).json()
    aborted = complete(guarded, **rule("abort")).json()
    [flag] = flagged["sae"]["guardrails"]
    assert flagged["choices"][0]["text"] == plain["text"] and flagged["choices"][0]["finish_reason"] == "length"
    assert flag["name"] == "my-flag" and flag["action"] == "flag"
    assert aborted["sae"]["guardrails"] == [{"name": "my-abort", "action": "abort", "token_index": flag["token_index"]}]
    choice = aborted["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert plain["text"].startswith(choice["text"]) and len(choice["text"]) < len(plain["text"])
    # generated tokens up to the firing one, then the stop token the sampler emitted
    assert aborted["usage"]["completion_tokens"] == flag["token_index"] - aborted["usage"]["prompt_tokens"] + 2

    events = stream(guarded, **rule("abort"))
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert events[-1]["sae"]["guardrails"] == aborted["sae"]["guardrails"]

    from sae_serve.server.grpc_stubs import load

    pb, pb_grpc = load()
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=12, guardrails=[pb.Guardrail(
        name="my-abort", action=pb.ABORT, when=pb.Trigger(probe="french", above=pb.Threshold(value=0.0)))])
    with grpc.intercept_channel(grpc.insecure_channel(guarded.grpc_address), WithApiKey()) as channel:
        messages = list(pb_grpc.SaeServeStub(channel).Generate(request, timeout=120))
    assert "".join(m.text for m in messages) == choice["text"]
    assert messages[-1].finish_reason == "content_filter"
    assert [(g.name, g.action, g.token_index) for g in messages[-1].guardrails] == [
        ("my-abort", pb.ABORT, flag["token_index"])]


def test_the_servers_own_rule_applies_unseen_to_requests_that_name_none(guarded) -> None:
    before = metric(guarded.base, "sae_serve_guardrail_triggered_total", rule="no-war", action="abort")
    peaceful = complete(guarded).json()
    assert peaceful["choices"][0]["finish_reason"] == "length" and "sae" not in peaceful
    warlike = complete(guarded, prompt=WAR).json()
    assert warlike["choices"][0]["finish_reason"] == "content_filter", warlike
    assert "sae" not in warlike  # the operator's rule is not shown to clients
    assert metric(guarded.base, "sae_serve_guardrail_triggered_total", rule="no-war", action="abort") == before + 1
    own = complete(guarded, prompt=WAR, **rule("flag")).json()  # a client's own rules do not switch it off
    assert own["choices"][0]["finish_reason"] == "content_filter" and own["sae"]["guardrails"] == []
    events = stream(guarded, prompt=WAR)
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert "".join(e["choices"][0]["text"] for e in events) == warlike["choices"][0]["text"]


def test_the_servers_rules_also_cut_routes_that_do_not_steer(guarded) -> None:
    """A client picking another route (the Responses API here) does not step around the server's
    rules: the workers cut its text where the chat route's ends with content_filter."""
    model = httpx.get(guarded.base + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]
    chat = httpx.post(guarded.base + "/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": WAR}], "max_tokens": 40, "temperature": 0}).json()
    assert chat["choices"][0]["finish_reason"] == "content_filter", chat
    answer = httpx.post(guarded.base + "/v1/responses", headers=AUTH, timeout=120, json={
        "model": model, "input": WAR, "max_output_tokens": 40, "temperature": 0}).json()
    text = "".join(part["text"] for item in answer["output"] for part in item.get("content") or ())
    assert text == chat["choices"][0]["message"]["content"]
    assert answer["usage"]["output_tokens"] == chat["usage"]["completion_tokens"] < 40, (text, answer["usage"])


def test_each_sequence_of_n_and_prompt_lists_is_watched_alone(guarded) -> None:
    """n and prompt lists run one engine request per sequence (fan_out.py): each choice is watched by
    its own rules and the server's as if it were sent alone, in one response and in one stream."""
    sampled = {"temperature": 0.2, "seed": 5, **rule("flag")}  # (vLLM refuses n > 1 with greedy sampling)
    alone = {(p, j): complete(guarded, prompt=p, **{**sampled, "seed": 5 + j}).json()  # vLLM seeds child j so
             for p in (PROMPT, WAR) for j in range(2)}
    both = complete(guarded, prompt=[PROMPT, WAR], n=2, **sampled).json()
    events = stream(guarded, prompt=[PROMPT, WAR], n=2, stream_options={"include_usage": True}, **sampled)
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3] and "sae" not in both
    assert {alone[WAR, j]["choices"][0]["finish_reason"] for j in range(2)} == {"content_filter"}
    assert any(alone[key]["sae"]["guardrails"] for key in alone)  # the request's own rule fired somewhere
    for choice, key in zip(both["choices"], [(PROMPT, 0), (PROMPT, 1), (WAR, 0), (WAR, 1)], strict=True):
        solo = alone[key]
        assert choice["text"] == solo["choices"][0]["text"]
        assert choice["finish_reason"] == solo["choices"][0]["finish_reason"]
        assert choice["sae"]["guardrails"] == solo["sae"]["guardrails"]
        mine = [c for e in events for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
        assert mine[-1]["sae"]["guardrails"] == choice["sae"]["guardrails"]
    assert both["usage"]["prompt_tokens"] == sum(alone[p, 0]["usage"]["prompt_tokens"] for p in (PROMPT, WAR))
    assert both["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone.values())
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert events[-1]["choices"] == []
    assert [events[-1]["usage"][k] for k in counts] == [both["usage"][k] for k in counts]
    assert len({e["id"] for e in events}) == 1


def test_bad_or_forbidden_rules_are_refused_naming_the_field(guarded) -> None:
    steer = {**rule("steer")["guardrails"][0], "steering": {"interventions": [
        {"sae": "layer15", "feature": "military", "mode": "clamp", "multiple_of_max": 3.0}]}}
    cases = [({"guardrails": [steer]}, 403, "guardrails[0].action"),
             (rule("abort", {"probe": "nope", "above": {"value": 1}}), 400, "guardrails[0].when.probe"),
             (rule("abort", {**FRENCH, "tokens": 4, "window": 2}), 400, "guardrails[0].when"),
             ({"guardrails": "all of them"}, 400, "guardrails"),
             ({"use_beam_search": True}, 400, "use_beam_search"),  # its own params: the rules would not run
             ({"n": 65, "temperature": 1.0}, 400, "n"),  # limits.max_sequences: each sequence is watched alone
             ({"response_format": {"type": "json_object"}}, 400, "response_format")]  # its grammar vs the stop
    for extra, status, field in cases:
        response = complete(guarded, **extra)
        assert response.status_code == status, (extra, response.text)
        assert response.json()["error"]["param"] == field, (extra, response.text)
    from sae_serve.server.grpc_stubs import load

    pb, pb_grpc = load()
    bad = pb.GenerateRequest(prompt="hi", guardrails=[pb.Guardrail(
        name="x", action=pb.FLAG, when=pb.Trigger(probe="nope", above=pb.Threshold(value=1)))])
    with (grpc.intercept_channel(grpc.insecure_channel(guarded.grpc_address), WithApiKey()) as channel,
          pytest.raises(grpc.RpcError) as info):
        list(pb_grpc.SaeServeStub(channel).Generate(bad, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "guardrails[0].when.probe" in info.value.details()
    assert complete(guarded).status_code == 200  # and it serves on
