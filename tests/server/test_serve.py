"""`sae-serve serve` end to end: vLLM's real OpenAI server with the sae_serve plugins, on 127.0.0.1,
driven by the official openai client and by the generated gRPC stubs; compared with the reference
engine. One server for the module; the SIGTERM test runs last."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import torch

from sae_serve.config import MetricsConfig, SaeServeConfig, write_config
from sae_serve.data import DEFAULT_SAE_DIR
from sae_serve.engines.hf import HFEngine
from sae_serve.sae.features import FeatureCatalog
from sae_serve.sae.formats import load_sae
from sae_serve.sae.registry import SaeEntry, registry_of
from sae_serve.steering.policy import FeatureSelector, Policy
from sae_serve.steering.spec import RequestSpec, resolve

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]
API_KEY = "test-key-7f3a"  # the module's server requires it, on HTTP and gRPC
AUTH = {"authorization": f"Bearer {API_KEY}"}
FRENCH = {"steering": {"interventions": [{"sae": "layer15", "feature": "french", "mode": "clamp",
                                          "multiple_of_max": 1.0}]}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict[str, str] = AUTH) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    """One server for the module; polls /health like vLLM's RemoteOpenAIServer; SIGTERM at the end."""
    port = _free_port()
    folder = tmp_path_factory.mktemp("server")
    log_path = folder / "server.log"
    log = log_path.open("w")
    policy = Policy(steerable={"layer15": FeatureSelector(tags=("language", "topic", "entity", "code"))},
                    max_abs_multiple_of_max=4)
    config = write_config(SaeServeConfig(saes=(SaeEntry(name="layer15", path=str(DEFAULT_SAE_DIR)),), policy=policy,
                                         metrics=MetricsConfig(enabled=True)), folder / "config.json")
    grpc_port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sae_serve.cli", "serve", "--port", str(port),
                             "--grpc-port", str(grpc_port), "--config", str(config), "--",
                             "--enforce-eager", "--max-model-len", "1024", "--api-key", API_KEY],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
        pytest.fail("server did not become healthy")
    yield base, proc, f"127.0.0.1:{grpc_port}"
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    base, _, _ = server
    c = OpenAI(base_url=base + "/v1", api_key=API_KEY)
    return c, c.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(hf_model) -> HFEngine:
    model, tokenizer = hf_model
    sae = load_sae(DEFAULT_SAE_DIR)
    return HFEngine(model, tokenizer, registry_of({"layer15": sae},
                                                  {"layer15": FeatureCatalog.load(DEFAULT_SAE_DIR, sae.d_sae)}))


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
    assert applied == [{"sae": "layer15", "feature": 4563, "label": "french", "mode": "clamp",
                        "value": pytest.approx(7.6258, abs=1e-3)}]
    assert "sae" not in (plain.model_extra or {})


def test_activations_in_the_response_match_the_reference(client, reference) -> None:
    c, model = client
    body = {"return_features": {"sae": "layer15", "features": ["french", "military", 100]}}
    out = c.completions.create(model=model, prompt="Le chat dort sur le canapé", max_tokens=4, temperature=0,
                               extra_body=body)
    tokens = out.model_extra["sae"]["features"]["tokens"]
    req = resolve(RequestSpec.model_validate(body), reference.registry)
    [want] = reference.generate(["Le chat dort sur le canapé"], [req], max_new_tokens=4)
    assert [t["position"] for t in tokens] == want.features.positions.tolist()
    got = torch.tensor([[f["activation"] for f in t["features"]] for t in tokens])
    torch.testing.assert_close(got, want.features.values, atol=2e-2, rtol=2e-2)
    assert tokens[1]["features"][0]["label"] == "french"


def test_chat_and_streaming_are_steered(client) -> None:
    c, model = client
    question = [{"role": "user", "content": "What is your favourite food?"}]
    chat = c.chat.completions.create(model=model, messages=question, max_tokens=12, temperature=0, extra_body=FRENCH)
    assert "la" in chat.choices[0].message.content.lower()
    whole = c.completions.create(model=model, prompt="The weather today is", max_tokens=10, temperature=0,
                                 extra_body=FRENCH).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model, prompt="The weather today is", max_tokens=10, temperature=0, stream=True, extra_body=FRENCH))
    assert streamed == whole


def test_stream_chunks_carry_the_activations_of_their_tokens(client) -> None:
    c, model = client
    body = {**FRENCH, "return_features": {"sae": "layer15", "top_k": 2}}
    whole = c.completions.create(model=model, prompt="The weather today is", max_tokens=6, temperature=0,
                                 extra_body=body)
    chunks = list(c.completions.create(model=model, prompt="The weather today is", max_tokens=6, temperature=0,
                                       stream=True, extra_body=body))
    with_sae = [ch.model_extra["sae"] for ch in chunks if (ch.model_extra or {}).get("sae")]
    assert len(with_sae) > 2  # spread over the stream, not all at the end
    assert chunks[-1].choices[0].finish_reason is not None and "applied" in with_sae[-1]
    assert all("applied" not in sae for sae in with_sae[:-1])
    plain = whole.model_extra["sae"]
    assert with_sae[-1]["applied"] == plain["applied"]
    streamed = [t for sae in with_sae for t in sae["features"]["tokens"]]
    assert [t["position"] for t in streamed] == [t["position"] for t in plain["features"]["tokens"]]
    got = torch.tensor([[f["activation"] for f in t["features"]] for t in streamed])
    want = torch.tensor([[f["activation"] for f in t["features"]] for t in plain["features"]["tokens"]])
    torch.testing.assert_close(got, want)


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
            {"sae": "layer15", "feature": "french", "mode": "clamp", "multiple_of_max": 10}]}})
    assert "steering.interventions[0].multiple_of_max" in str(info.value) and "limit of 4" in str(info.value)


def test_saes_and_feature_cards(server) -> None:
    base, _, _ = server
    status, saes = _get(base + "/v1/saes")
    [sae] = saes["data"]
    assert status == 200 and (sae["name"], sae["d_sae"], sae["hook_layer"]) == ("layer15", 4608, 15)
    assert {w["label"] for w in sae["watchlist"]} >= {"wrongdoing", "military"}
    status, card = _get(base + "/v1/features/layer15/french")
    assert status == 200 and card["feature"] == 4563 and card["max_activation"] > 0
    status, err = _get(base + "/v1/features/layer15/nope")
    assert status == 404 and err["error"]["param"] == "feature"
    status, schema = _get(base + "/openapi.json")
    assert "steering" in json.dumps(schema["components"]["schemas"])


def _samples(base: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("sae_serve")]


def test_metrics_on_the_shared_endpoint(server, client) -> None:
    base, _, _ = server
    c, model = client
    c.completions.create(model=model, prompt="He lied to the police and deceived the wicked judge", max_tokens=4,
                         temperature=0)
    c.completions.create(model=model, prompt="My favourite food is", max_tokens=2, extra_body=FRENCH)
    samples = _samples(base)
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

    base, _, _ = server
    c, model = client
    c.completions.create(model=model, prompt="He lied to the police", max_tokens=4, extra_body=FRENCH)
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
    base, _, _ = server
    port = _free_port()
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
            except OSError:
                continue
        assert {r["metric"]["feature"] for r in result} >= {"wrongdoing", "cunning", "military"}
        assert all(float(r["value"][1]) > 0 for r in result)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _WithApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamStreamClientInterceptor):
    """Adds the API key to every call, as a client of a keyed server does."""

    @staticmethod
    def _with_key(details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), *AUTH.items()])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


@pytest.fixture(scope="module")
def grpc_stub(server):
    import grpc

    from sae_serve.server.grpc_stubs import load

    pb, pb_grpc = load()
    channel = grpc.intercept_channel(grpc.insecure_channel(server[2]), _WithApiKey())
    yield pb, pb_grpc.SaeServeStub(channel), channel
    channel.close()


def test_grpc_generate_equals_http(grpc_stub, client) -> None:
    pb, stub, _ = grpc_stub
    c, model = client
    request = pb.GenerateRequest(
        prompt="My favourite food is", max_tokens=12, temperature=0,
        steering=pb.Steering(interventions=[pb.Intervention(sae="layer15", feature=pb.FeatureRef(label="french"),
                                                            mode=pb.CLAMP, multiple_of_max=1.0)]),
        return_features=pb.FeatureReadout(sae="layer15", features=[pb.FeatureRef(label="french")]))
    messages = list(stub.Generate(request, timeout=120))
    http = c.completions.create(model=model, prompt="My favourite food is", max_tokens=12, temperature=0,
                                extra_body={**FRENCH, "return_features": {"sae": "layer15", "features": ["french"]}})
    assert "".join(m.text for m in messages) == http.choices[0].text
    final = messages[-1]
    assert final.finish_reason == "length" and len(messages) > 2  # streamed, then finished
    assert [(a.feature, a.label, a.mode) for a in final.applied] == [(4563, "french", pb.CLAMP)]
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
    assert card.label == "french" and card.max_activation > 0
    with pytest.raises(grpc.RpcError) as info:
        stub.GetFeature(pb.GetFeatureRequest(sae="layer15", feature=pb.FeatureRef(label="nope")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()
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
    (lambda pb: pb.Intervention(sae="layer15", feature=pb.FeatureRef(label="french"), mode=pb.CLAMP,
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
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt="Tell me a story.", min_tokens=400, max_tokens=400), timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ok = list(stub.Generate(pb.GenerateRequest(prompt="The capital of France is", max_tokens=3), timeout=60))
    assert "".join(m.text for m in ok).startswith(" Paris")  # the server keeps serving


def test_api_keys_guard_http_and_grpc_but_not_health(server, grpc_stub) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sae_serve.server.grpc_stubs import load

    base, _, address = server
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

    base, _, _ = server
    _, model = client
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        response = httpx.post(base + path, headers=AUTH, timeout=30,
                              json={"model": model, **body, "structured_outputs": False})
        assert response.status_code == 400 and "structured_outputs" in response.json()["error"]["message"]


def _bounded(body: object, model: str, chat: bool) -> None:
    """Keep a generated request cheap on a CPU (few tokens, one choice, a prompt); other fields stay."""
    if not isinstance(body, dict):
        return
    body["model"] = model
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body.get(name), bool):
            body[name] = max(-1, min(body[name], 4))
    for name in ("n", "best_of", "min_tokens", "prompt_embeds"):
        body.pop(name, None)
    if not chat and not body.get("prompt"):
        body["prompt"] = "Hello"
    for name in ("prompt", "messages"):
        if isinstance(body.get(name), list):
            body[name] = body[name][:2]


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_schemathesis_finds_no_server_error_on_the_steering_endpoints(server, client, path: str, mode: str) -> None:
    """Bodies generated from /openapi.json, with `steering` and `return_features` made required so
    every case exercises them (valid bodies, then invalid ones): never a 5xx, the server stays up,
    and every refusal of a steering field names it in `param`."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    base, proc, _ = server
    _, model = client
    document = _get(base + "/openapi.json")[1]
    body_schema = document["components"]["schemas"][
        "SteeredChatCompletionRequest" if "chat" in path else "SteeredCompletionRequest"]
    body_schema["required"] = [*body_schema.get("required", []), "steering", "return_features"]
    operation = schemathesis.openapi.from_dict(document)[path]["POST"]
    steering_answered = 0

    @settings(max_examples=30, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def call(case) -> None:
        nonlocal steering_answered
        _bounded(case.body, model, chat="chat" in path)
        response = case.call(base_url=base, headers=AUTH, timeout=120)
        assert response.status_code < 500, (case.body, response.text[:500])
        error = response.json().get("error") if response.status_code >= 400 else None
        if response.status_code < 400:
            steering_answered += 1
        elif error is not None:  # (FastAPI answers a body that is not JSON with {"detail": ...})
            assert error["message"], response.text
            param = error.get("param") or ""
            if param.startswith(("steering", "return_features")):
                steering_answered += 1
            else:
                assert not error["message"].startswith(("steering", "return_features")), response.text

    call()
    assert proc.poll() is None
    if mode == "positive":  # the cases reached the steering code, not just vLLM's own checks
        assert steering_answered > 0


def _server_rss(proc: subprocess.Popen) -> int:
    import psutil

    root = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_64_concurrent_steered_streams_equal_their_solo_runs(server, client) -> None:
    """A bounded loopback load: 64 streams with random specs at once; each equals its solo run."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    _, proc, _ = server
    c, model = client
    rng = random.Random(7)
    labels = ["french", "military", "soviet", "london", "python-return"]
    jobs = []
    for i in range(64):
        spec = {"steering": {"interventions": [
            {"sae": "layer15", "feature": f, "mode": rng.choice(["clamp", "add", "scale"]),
             "value": round(rng.uniform(0, 3), 2)} for f in rng.sample(labels, rng.randint(0, 2))]}}
        jobs.append((f"Request {i}: my favourite thing is", spec))

    def stream(job: tuple[str, dict]) -> str:
        prompt, spec = job
        chunks = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                      extra_body=spec)
        return "".join(ch.choices[0].text for ch in chunks)

    stream(jobs[0])  # warm
    before = _server_rss(proc)
    with ThreadPoolExecutor(max_workers=64) as pool:
        together = list(pool.map(stream, jobs))
    solo = [stream(job) for job in jobs]
    assert together == solo
    assert len(set(together)) > 8  # the specs really differ
    growth = _server_rss(proc) - before
    assert growth < 300 * 2**20, f"server memory grew by {growth / 2**20:.0f} MiB"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client) -> None:
    import httpx

    base, _, _ = server
    c, model = client
    body = {"model": model, "prompt": "Tell me a story.", "max_tokens": 400, "min_tokens": 400, "stream": True,
            **FRENCH}
    with httpx.Client(timeout=30, headers=AUTH) as http, \
            http.stream("POST", base + "/v1/completions", json=body) as response:
        next(response.iter_lines())  # one chunk, then hang up
    deadline = time.time() + 5  # 400 tokens take over 10 s here: only an abort empties the slot this soon
    running = 1.0
    while time.time() < deadline and running:
        time.sleep(1)
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            running = sum(float(line.split()[-1]) for line in r.read().decode().splitlines()
                          if line.startswith("vllm:num_requests_running"))
    assert running == 0  # the abandoned request was aborted, not run to 400 tokens
    ok = c.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert ok.choices[0].text.startswith(" Paris")


def test_sigterm_drains_and_exits_zero(server) -> None:
    _, proc, _ = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
