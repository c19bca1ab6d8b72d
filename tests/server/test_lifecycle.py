"""A server of its own: a deployment whose workers run another catalog than its API process
(config drift), so an admitted request fails on the workers, which must never answer as success;
then SIGTERM while 16 streams are mid-generation."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sae_serve.config import SaeServeConfig, write_config
from sae_serve.data import DEFAULT_SAE_DIR
from sae_serve.sae.registry import SaeEntry
from tests.server.harness import AUTH, FRENCH, Server, WithApiKey, metric, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def drifted(default_model_dir, tmp_path_factory) -> Server:
    """The API process knows feature 4563 as `non-english`; the workers' copy of the catalog renamed it."""
    folder = tmp_path_factory.mktemp("drifted")
    shutil.copytree(DEFAULT_SAE_DIR, folder / "sae")
    catalog = json.loads((folder / "sae" / "features.json").read_text())
    catalog["features"]["4563"]["label"] = "francais"
    (folder / "sae" / "features.json").write_text(json.dumps(catalog))
    api = write_config(SaeServeConfig(saes=(SaeEntry(name="layer15", path=str(DEFAULT_SAE_DIR)),)),
                       folder / "config.json")
    workers = SaeServeConfig(saes=(SaeEntry(name="layer15", path=str(folder / "sae")),))
    running = start_server(api, folder, "--additional-config", json.dumps({"sae_serve": workers.model_dump()}))
    yield running
    running.stop()


def test_a_request_the_workers_fail_is_never_a_success(drifted) -> None:
    base = drifted.base
    with httpx.Client(base_url=base, headers=AUTH, timeout=120) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "My favourite food is", "max_tokens": 6, "temperature": 0}
        failed = metric(base, "sae_serve_refused_requests_total", reason="worker_error")
        response = http.post("/v1/completions", json={**body, **FRENCH})
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["type"] == "InternalServerError" and "no feature is labelled 'non-english'" in error["message"]
        with http.stream("POST", "/v1/completions", json={**body, **FRENCH, "stream": True}) as stream:
            events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
        assert not any('"finish_reason":"' in e.replace(" ", "") for e in events)  # never finished as a success
        by_index = {"steering": {"interventions": [{"sae": "layer15", "feature": 4563, "mode": "clamp",
                                                    "value": 7.6}]}}
        ok = http.post("/v1/completions", json={**body, **by_index})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"].startswith(" la la")
    from sae_serve.server.grpc_stubs import load

    pb, pb_grpc = load()
    with grpc.intercept_channel(grpc.insecure_channel(drifted.grpc_address), WithApiKey()) as channel:
        request = pb.GenerateRequest(prompt="My favourite food is", max_tokens=4, steering=pb.Steering(interventions=[
            pb.Intervention(sae="layer15", feature=pb.FeatureRef(label="non-english"), mode=pb.CLAMP, value=2.0)]))
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.SaeServeStub(channel).Generate(request, timeout=60))
        assert info.value.code() == grpc.StatusCode.INTERNAL and "non-english" in info.value.details()
    assert metric(base, "sae_serve_refused_requests_total", reason="worker_error") == failed + 3


def test_sigterm_mid_generation_turns_unready_first_then_drains_and_exits_zero(drifted) -> None:
    base = drifted.base
    model = httpx.get(base + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]
    streaming, outcomes = threading.Semaphore(0), []

    def stream(i: int) -> None:
        body = {"model": model, "prompt": f"Story {i}:", "max_tokens": 40, "min_tokens": 40, "stream": True,
                "temperature": 0}
        events: list[dict] = []
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line.removeprefix("data: ")))
                        if len(events) == 1:
                            streaming.release()
        except httpx.HTTPError as exc:
            events.append({"error": repr(exc)})
        finish = next((e["choices"][0]["finish_reason"] for e in events if e.get("choices")
                       and e["choices"][0].get("finish_reason")), None)
        outcomes.append((finish, next((e["error"] for e in events if "error" in e), None)))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for _ in threads:  # every stream has its first tokens
        assert streaming.acquire(timeout=120)
    drifted.proc.send_signal(signal.SIGTERM)
    with grpc.insecure_channel(drifted.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline, status = time.time() + 10, health_pb2.HealthCheckResponse.SERVING
        while time.time() < deadline and status == health_pb2.HealthCheckResponse.SERVING:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            time.sleep(0.05)
        streams_done_when_unready = sum(1 for t in threads if not t.is_alive())
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING and streams_done_when_unready < 16
        from sae_serve.server.grpc_stubs import load

        pb, pb_grpc = load()
        with pytest.raises(grpc.RpcError) as info:  # no new work while draining
            list(pb_grpc.SaeServeStub(channel).Generate(pb.GenerateRequest(prompt="hi", max_tokens=2),
                                                        metadata=tuple(AUTH.items()), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(timeout=120)
    assert len(outcomes) == 16
    assert all(finish == "length" or error for finish, error in outcomes), outcomes
    assert drifted.proc.wait(timeout=90) == 0
