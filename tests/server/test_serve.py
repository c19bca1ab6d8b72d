"""`sae-serve serve` end to end: vLLM's real OpenAI server with the sae_serve plugins, on 127.0.0.1,
driven by the official openai client and by the generated gRPC stubs; compared with the reference
engine. The server is shared by the tests/server modules (conftest.py)."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.request

import grpc
import pytest
import torch

from sae_serve.steering.spec import RequestSpec, resolve
from tests.server.harness import API_KEY, AUTH, FRENCH, free_port, metric_samples
from tests.server.harness import get_json as _get

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]


def test_steered_and_plain_completions_match_the_reference(client, reference) -> None:
    c, model = client
    plain = c.completions.create(model=model, prompt="My favourite food is", max_tokens=12, temperature=0)
    steered = c.completions.create(model=model, prompt="My favourite food is", max_tokens=12, temperature=0,
                                   extra_body=FRENCH)
    req = resolve(RequestSpec.model_validate(FRENCH), reference.registry)
    want_plain, want_steered = reference.generate(["My favourite food is"] * 2, [None, req], max_new_tokens=12)
    assert plain.choices[0].text == want_plain.text
    assert steered.choices[0].text == want_steered.text != plain.choices[0].text
    applied = steered.model_extra["sae"]["applied"]
    assert applied == [{"sae": "layer15", "feature": 4563, "label": "non-english", "mode": "clamp",
                        "value": pytest.approx(7.6258, abs=1e-3)}]
    assert "sae" not in (plain.model_extra or {})


def test_activations_in_the_response_match_the_reference(client, reference) -> None:
    c, model = client
    body = {"return_features": {"sae": "layer15", "features": ["non-english", "military", 100]}}
    out = c.completions.create(model=model, prompt="Le chat dort sur le canapé", max_tokens=4, temperature=0,
                               extra_body=body)
    tokens = out.model_extra["sae"]["features"]["tokens"]
    req = resolve(RequestSpec.model_validate(body), reference.registry)
    [want] = reference.generate(["Le chat dort sur le canapé"], [req], max_new_tokens=4)
    assert [t["position"] for t in tokens] == want.features.positions.tolist()
    got = torch.tensor([[f["activation"] for f in t["features"]] for t in tokens])
    torch.testing.assert_close(got, want.features.values, atol=2e-2, rtol=2e-2)
    assert tokens[1]["features"][0]["label"] == "non-english"


def _french_mass(choice) -> float:
    """Probability of the next token being a common French word, from the top-20 logprobs."""
    from tests.train.test_default_sae import FRENCH_WORDS

    return sum(math.exp(t.logprob) for t in choice.logprobs.content[0].top_logprobs if t.token in FRENCH_WORDS)


def test_chat_and_streaming_are_steered(client) -> None:
    c, model = client
    question = [{"role": "user", "content": "What is your favourite food?"},
                {"role": "assistant", "content": "My favourite food is"}]
    masses = [_french_mass(c.chat.completions.create(
        model=model, messages=question, max_tokens=1, temperature=0, logprobs=True, top_logprobs=20,
        extra_body={**body, "continue_final_message": True, "add_generation_prompt": False}).choices[0])
        for body in ({}, FRENCH)]
    assert masses[1] > 0.1 and masses[1] >= 10 * masses[0], masses
    whole = c.completions.create(model=model, prompt="The weather today is", max_tokens=10, temperature=0,
                                 extra_body=FRENCH).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model, prompt="The weather today is", max_tokens=10, temperature=0, stream=True, extra_body=FRENCH))
    assert streamed == whole


def test_stream_chunks_carry_the_activations_of_their_tokens(client) -> None:
    c, model = client
    body = {**FRENCH, "return_features": {"sae": "layer15", "top_k": 2}}
    whole = c.completions.create(model=model, prompt="The weather today is", max_tokens=12, temperature=0,
                                 extra_body=body)
    chunks = list(c.completions.create(model=model, prompt="The weather today is", max_tokens=12, temperature=0,
                                       stream=True, extra_body=body))
    with_sae = [ch.model_extra["sae"] for ch in chunks if (ch.model_extra or {}).get("sae")]
    assert len(with_sae) > 2  # spread over the stream, not all at the end (12 tokens: chunks merge if reading lags)
    assert chunks[-1].choices[0].finish_reason is not None and "applied" in with_sae[-1]
    assert all("applied" not in sae for sae in with_sae[:-1])
    plain = whole.model_extra["sae"]
    assert with_sae[-1]["applied"] == plain["applied"]
    streamed = [t for sae in with_sae for t in sae["features"]["tokens"]]
    assert [t["position"] for t in streamed] == [t["position"] for t in plain["features"]["tokens"]]
    got = torch.tensor([[f["activation"] for f in t["features"]] for t in streamed])
    want = torch.tensor([[f["activation"] for f in t["features"]] for t in plain["features"]["tokens"]])
    torch.testing.assert_close(got, want)


def test_each_choice_of_n_carries_its_own_activations(client) -> None:
    """n > 1 with a readout runs one engine request per choice (fan_out.py): each choice's own `sae`
    holds its tokens' activations, as a request for that choice alone gets them, streamed or not."""
    c, model = client
    body = {**FRENCH, "return_features": {"sae": "layer15", "top_k": 2}}
    messages = [{"role": "user", "content": "Say something about the sea."}]
    ask = {"model": model, "messages": messages, "max_tokens": 5, "temperature": 1.0, "extra_body": body}
    alone = [c.chat.completions.create(**ask, seed=3 + j) for j in range(2)]  # vLLM seeds child j so
    both = c.chat.completions.create(**ask, n=2, seed=3)
    chunks = list(c.chat.completions.create(**ask, n=2, seed=3, stream=True, stream_options={"include_usage": True}))

    def activations(tokens: list[dict]) -> tuple[list[int], torch.Tensor]:
        return [t["position"] for t in tokens], torch.tensor([[f["activation"] for f in t["features"]] for t in tokens])

    assert "sae" not in (both.model_extra or {}) and [ch.index for ch in both.choices] == [0, 1]
    assert both.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert chunks[-1].usage.model_dump() == both.usage.model_dump()
    for i, choice in enumerate(both.choices):
        want = alone[i].model_extra["sae"]
        assert choice.message.content == alone[i].choices[0].message.content
        assert choice.model_extra["sae"]["applied"] == want["applied"]
        streamed = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert "".join(part.delta.content or "" for part in streamed) == choice.message.content
        saes = [part.model_extra["sae"] for part in streamed if (part.model_extra or {}).get("sae")]
        wanted = activations(want["features"]["tokens"])
        streamed_tokens = [t for s in saes for t in s["features"]["tokens"]]
        for got in (choice.model_extra["sae"]["features"]["tokens"], streamed_tokens):
            positions, values = activations(got)
            assert positions == wanted[0]
            torch.testing.assert_close(values, wanted[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("body", "param"), [
    ({"steering": {"interventions": [{"sae": "layer15", "feature": "nope", "mode": "add", "value": 1}]}},
     "steering.interventions[0].feature"),
    ({"steering": {"interventions": [{"sae": "layer9", "feature": 1, "mode": "add", "value": 1}]}},
     "steering.interventions[0].sae"),
    ({"steering": {"interventions": [{"sae": "layer15", "feature": 1, "mode": "add", "value": "NaN"}]}},
     "steering.interventions[0].value"),
    ({"steering": {"interventions": [{"sae": "layer15", "feature": 1, "mode": "add", "value": 1,
                                      "path": "/etc/passwd"}]}}, "steering.interventions[0].path"),
    ({"return_features": {"sae": "layer15", "top_k": 500}}, "return_features.top_k"),
])
def test_bad_steering_is_a_400_naming_the_field(client, body: dict, param: str) -> None:
    from openai import BadRequestError

    c, model = client
    with pytest.raises(BadRequestError) as info:
        c.completions.create(model=model, prompt="hi", max_tokens=2, extra_body=body)
    assert param in str(info.value)
    ok = c.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert ok.choices[0].text.startswith(" Paris")  # the server keeps serving


def test_policy_refusals_name_the_field(client) -> None:
    from openai import BadRequestError, PermissionDeniedError

    c, model = client
    with pytest.raises(PermissionDeniedError) as info:  # tagged safety only: not steerable here
        c.completions.create(model=model, prompt="hi", max_tokens=2, extra_body={"steering": {"interventions": [
            {"sae": "layer15", "feature": "wrongdoing", "mode": "clamp", "multiple_of_max": 1}]}})
    assert "steering.interventions[0].feature" in str(info.value) and "may not be steered" in str(info.value)
    with pytest.raises(BadRequestError) as info:
        c.completions.create(model=model, prompt="hi", max_tokens=2, extra_body={"steering": {"interventions": [
            {"sae": "layer15", "feature": "non-english", "mode": "clamp", "multiple_of_max": 10}]}})
    assert "steering.interventions[0].multiple_of_max" in str(info.value) and "limit of 4" in str(info.value)


def test_saes_and_feature_cards(server) -> None:
    base = server.base
    status, saes = _get(base + "/v1/saes")
    [sae] = saes["data"]
    assert status == 200 and (sae["name"], sae["d_sae"], sae["hook_layer"]) == ("layer15", 4608, 15)
    assert {w["label"] for w in sae["watchlist"]} >= {"wrongdoing", "military"}
    status, card = _get(base + "/v1/features/layer15/non-english")
    assert status == 200 and card["feature"] == 4563 and card["max_activation"] > 0
    for missing in ("nope", "%C2%B2", "99999"):  # a label, a non-ASCII digit (a label too), an index
        status, err = _get(base + f"/v1/features/layer15/{missing}")
        assert status == 404 and err["error"]["param"] == "feature", (missing, err)
    status, schema = _get(base + "/openapi.json")
    assert "steering" in json.dumps(schema["components"]["schemas"])


def test_the_explorers_catalog_routes_refuse_bad_input(server) -> None:
    """The routes /ui reads: a search and a feature's examples; bad input is refused, naming it."""
    base = server.base
    status, found = _get(base + "/v1/features/layer15?q=non-english&limit=3")
    assert status == 200 and found["data"][0]["feature"] == 4563 and len(found["data"]) <= 3
    status, err = _get(base + "/v1/features/nope?q=x")
    assert status == 404 and err["error"]["param"] == "sae"
    status, err = _get(base + "/v1/features/layer15/99999/examples")
    assert status == 404 and err["error"]["param"] == "feature"
    for query in ("limit=0", "limit=many", "limit=100000", "q=" + "x" * 201):
        status, err = _get(base + f"/v1/features/layer15?{query}")
        assert status == 400 and err["error"]["param"] == "query." + query.split("=")[0], (query, err)


def test_metrics_on_the_shared_endpoint(server, client) -> None:
    base = server.base
    c, model = client
    c.completions.create(model=model, prompt="He lied to the police and deceived the wicked judge", max_tokens=4,
                         temperature=0)
    c.completions.create(model=model, prompt="My favourite food is", max_tokens=2, extra_body=FRENCH)
    samples = metric_samples(base)
    m = {f"{s.name}{sorted(s.labels.items())}": s.value for s in samples}
    key = "sae_serve_feature_tokens_total[('feature', 'wrongdoing'), ('sae', 'layer15')]"
    assert m[key] > 10  # every token of every request is watched, steered or not
    assert m["sae_serve_feature_activation_count[('feature', 'wrongdoing'), ('sae', 'layer15')]"] > 0
    assert m["sae_serve_steered_requests_total[('mode', 'clamp')]"] >= 1
    assert m["sae_serve_refused_requests_total[('reason', 'policy_forbidden')]"] >= 1
    assert m["sae_serve_hook_seconds_count[('sae', 'layer15')]"] > 0
    label_names = {name for sample in samples for name in sample.labels}
    assert label_names <= {"sae", "feature", "mode", "reason", "le"}  # bounded: nothing per request


def test_every_metric_the_dashboard_and_rules_use_is_exported(server, client) -> None:
    """deploy/grafana and deploy/prometheus name only series this server exports (or rules record)."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.deploy.tools import all_expressions, metric_names, recorded_names

    base = server.base
    c, model = client
    flag = {"name": "fr", "action": "flag", "when": {"sae": "layer15", "feature": "non-english",
                                                      "above": {"value": 0.1}, "positions": "all"}}
    # A French prompt fires the rule on its own tokens, whatever is sampled after it (CI once sampled
    # an English prompt's continuation that never crossed the threshold).
    flagged = c.completions.create(model=model, prompt="Le chat dort sur le canapé", max_tokens=4, temperature=0,
                                   extra_body={**FRENCH, "guardrails": [flag]})
    assert flagged.model_extra["sae"]["guardrails"][0]["name"] == "fr"  # (the rules' guardrail series exists)
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        exported = {s.name for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    known = exported | recorded_names()
    missing = {where: sorted(metric_names(expr) - known) for where, expr in all_expressions().items()
               if metric_names(expr) - known}
    assert not missing


def test_a_real_prometheus_scrapes_the_watched_features(server, tmp_path) -> None:
    import shutil

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the Debian package prometheus is not installed (`make install-system`)")
    base = server.base
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: sae_serve, static_configs: [{{targets: ['{base.removeprefix('http://')}']}}]}}]\n")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        query = "sum by (feature) (sae_serve_feature_tokens_total)"
        url = f"http://127.0.0.1:{port}/api/v1/query?query=" + urllib.request.quote(query)
        deadline, result = time.time() + 60, []
        while time.time() < deadline and not result:
            time.sleep(2)
            try:
                result = _get(url)[1]["data"]["result"]
            except (OSError, ValueError):  # not listening yet, or a 503 in plain text while its TSDB opens
                continue
        assert {r["metric"]["feature"] for r in result} >= {"wrongdoing", "cunning", "military"}
        assert all(float(r["value"][1]) > 0 for r in result)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_grpc_generate_equals_http(grpc_stub, client) -> None:
    pb, stub, _ = grpc_stub
    c, model = client
    request = pb.GenerateRequest(
        prompt="My favourite food is", max_tokens=12, temperature=0,
        steering=pb.Steering(interventions=[pb.Intervention(sae="layer15", feature=pb.FeatureRef(label="non-english"),
                                                            mode=pb.CLAMP, multiple_of_max=1.0)]),
        return_features=pb.FeatureReadout(sae="layer15", features=[pb.FeatureRef(label="non-english")]))
    messages = list(stub.Generate(request, timeout=120))
    http = c.completions.create(model=model, prompt="My favourite food is", max_tokens=12, temperature=0,
                                extra_body={**FRENCH,
                                            "return_features": {"sae": "layer15", "features": ["non-english"]}})
    assert "".join(m.text for m in messages) == http.choices[0].text
    final = messages[-1]
    assert final.finish_reason == "length" and len(messages) > 2  # streamed, then finished
    assert [(a.feature, a.label, a.mode) for a in final.applied] == [(4563, "non-english", pb.CLAMP)]
    assert sum(bool(m.features) for m in messages) > 2  # each message carries its tokens' activations
    got = [t.features[0].activation for m in messages for t in m.features]
    want = [t["features"][0]["activation"] for t in http.model_extra["sae"]["features"]["tokens"]]
    assert got == pytest.approx(want, abs=1e-3)


def test_grpc_list_get_health_reflection(grpc_stub) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    pb, stub, channel = grpc_stub
    [sae] = stub.ListSaes(pb.ListSaesRequest()).saes
    assert (sae.name, sae.d_sae, sae.hook_layer) == ("layer15", 4608, 15) and 4263 in sae.watchlist
    card = stub.GetFeature(pb.GetFeatureRequest(sae="layer15", feature=pb.FeatureRef(index=4563)))
    assert card.label == "non-english" and card.max_activation > 0
    with pytest.raises(grpc.RpcError) as info:
        stub.GetFeature(pb.GetFeatureRequest(sae="layer15", feature=pb.FeatureRef(label="nope")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # an all-digit label is a label, not feature 123
        stub.GetFeature(pb.GetFeatureRequest(sae="layer15", feature=pb.FeatureRef(label="123")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no feature is labelled '123'" in info.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "sae_serve.v1.SaeServe" in {s.name for s in reply.list_services_response.service}


@pytest.mark.parametrize(("build", "code", "field"), [
    (lambda pb: pb.Intervention(sae="layer15", feature=pb.FeatureRef(label="nope"), mode=pb.ADD, value=1),
     "INVALID_ARGUMENT", "steering.interventions[0].feature"),
    (lambda pb: pb.Intervention(sae="layer15", feature=pb.FeatureRef(index=3), value=1),
     "INVALID_ARGUMENT", "steering.interventions[0].mode"),
    (lambda pb: pb.Intervention(sae="layer15", feature=pb.FeatureRef(index=3), mode=pb.ADD, value=float("nan")),
     "INVALID_ARGUMENT", "steering.interventions[0].value"),
    (lambda pb: pb.Intervention(sae="layer15", feature=pb.FeatureRef(label="wrongdoing"), mode=pb.CLAMP,
                                multiple_of_max=1), "PERMISSION_DENIED", "steering.interventions[0].feature"),
    (lambda pb: pb.Intervention(sae="layer15", feature=pb.FeatureRef(label="non-english"), mode=pb.CLAMP,
                                multiple_of_max=10), "INVALID_ARGUMENT", "steering.interventions[0].multiple_of_max"),
])
def test_grpc_refusals_name_the_field(grpc_stub, build, code: str, field: str) -> None:
    import grpc

    pb, stub, _ = grpc_stub
    request = pb.GenerateRequest(prompt="hi", max_tokens=2, steering=pb.Steering(interventions=[build(pb)]))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=60))
    assert info.value.code() == getattr(grpc.StatusCode, code) and field in info.value.details()


def test_grpc_malformed_bytes_and_deadlines(grpc_stub) -> None:
    import grpc

    pb, stub, channel = grpc_stub
    raw = channel.unary_stream("/sae_serve.v1.SaeServe/Generate", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        list(raw(b"\xff\xff\xff\x07garbage", timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed sae_serve.v1.GenerateRequest" in info.value.details()
    for bad, field in ((pb.GenerateRequest(prompt=""), "prompt"), (pb.GenerateRequest(prompt="x", temperature=-1),
                       "temperature"), (pb.GenerateRequest(prompt="x", min_tokens=9, max_tokens=3), "min_tokens")):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(bad, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)
    # vLLM's own checks come back as INVALID_ARGUMENT too, not UNKNOWN.
    for bad, words in ((pb.GenerateRequest(prompt="x " * 1100, max_tokens=4), "maximum context length"),
                       (pb.GenerateRequest(prompt="x", temperature=3, max_tokens=2), "temperature")):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(bad, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt="Tell me a story.", min_tokens=400, max_tokens=400), timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Fields the proto does not define (a smuggled spec in unknown field 99) are dropped, never read.
    plain = pb.GenerateRequest(prompt="My favourite food is", max_tokens=6, temperature=0)
    smuggled = plain.SerializeToString() + b"\x9a\x06" + bytes([40]) + b'{"steering": {"interventions": []}}xxxxx'
    got = list(channel.unary_stream("/sae_serve.v1.SaeServe/Generate", request_serializer=lambda b: b,
                                    response_deserializer=pb.GenerateResponse.FromString)(smuggled, timeout=60))
    assert "".join(m.text for m in got) == "".join(m.text for m in stub.Generate(plain, timeout=60))
    ok = list(stub.Generate(pb.GenerateRequest(prompt="The capital of France is", max_tokens=3), timeout=60))
    assert "".join(m.text for m in ok).startswith(" Paris")  # the server keeps serving


def test_api_keys_guard_http_and_grpc_but_not_health(server, grpc_stub) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sae_serve.server.grpc_stubs import load

    base, address = server.base, server.grpc_address
    assert _get(base + "/v1/saes", headers={})[0] == 401
    assert _get(base + "/v1/saes", headers={"authorization": "Bearer wrong"})[0] == 401
    assert urllib.request.urlopen(base + "/health", timeout=10).status == 200
    pb, pb_grpc = load()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SaeServeStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", API_KEY),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ListSaes(pb.ListSaesRequest(), metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes send no keys
        assert stub.ListSaes(pb.ListSaesRequest(), metadata=tuple(AUTH.items()), timeout=10).saes


def test_a_non_object_structured_outputs_is_a_400_not_a_500(server, client) -> None:
    """vLLM 0.32 alone answers this with a 500 (found by the schemathesis test below)."""
    import httpx

    base = server.base
    _, model = client
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        response = httpx.post(base + path, headers=AUTH, timeout=30,
                              json={"model": model, **body, "structured_outputs": False})
        assert response.status_code == 400 and "structured_outputs" in response.json()["error"]["message"]


