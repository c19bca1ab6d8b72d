"""The shared server under load and fuzzing: generated bodies (schemathesis), 64 concurrent steered
streams, clients that hang up, and memory that stays flat while they do."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from tests.server.harness import AUTH, FRENCH, metric, server_rss
from tests.server.harness import get_json as _get

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]
# Per endpoint and mode (positive, negative): 500 per endpoint in CI; `make fuzz` runs more.
FUZZ_CASES = int(os.environ.get("SAE_SERVE_FUZZ_CASES", "250"))


def _bounded(body: object, model: str, chat: bool) -> None:
    """Keep a generated request cheap on a CPU whatever the machine's load: few tokens (set when the
    case leaves them out, else vLLM would generate up to the context), one choice, a short prompt,
    no grammar to compile; the steering fields stay as generated."""
    if not isinstance(body, dict):
        return
    body["model"] = model
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body.get(name), bool):
            body[name] = max(-1, min(body[name], 4))
    if not any(isinstance(body.get(n), int) and body[n] > 0 for n in ("max_tokens", "max_completion_tokens")):
        body["max_tokens"] = 4
    for name in ("n", "best_of", "min_tokens", "prompt_embeds", "structured_outputs", "response_format",
                 "tools", "tool_choice", "logits_processors"):
        body.pop(name, None)
    for name, value in body.items():  # vLLM 0.32 itself answers some sampling ints of 2**64 with a 500
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**31:
            body[name] = 2**31 - 1 if value > 0 else -(2**31)
    if not chat and not body.get("prompt"):
        body["prompt"] = "Hello"
    for name in ("prompt", "messages"):
        if isinstance(body.get(name), list):
            body[name] = body[name][:2]
        if isinstance(body.get(name), str):
            body[name] = body[name][:200]


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_schemathesis_finds_no_server_error_on_the_steering_endpoints(server, client, path: str, mode: str) -> None:
    """Bodies generated from /openapi.json, with `steering` and `return_features` made required so
    every case exercises them (valid bodies, then invalid ones): never a 5xx, the server stays up,
    and every refusal of a steering field names it in `param`."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    base, proc = server.base, server.proc
    _, model = client
    document = _get(base + "/openapi.json")[1]
    body_schema = document["components"]["schemas"][
        "SteeredChatCompletionRequest" if "chat" in path else "SteeredCompletionRequest"]
    body_schema["required"] = [*body_schema.get("required", []), "steering", "return_features"]
    operation = schemathesis.openapi.from_dict(document)[path]["POST"]
    steering_answered, cases = 0, 0

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def call(case) -> None:
        nonlocal steering_answered, cases
        cases += 1
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
    assert cases >= FUZZ_CASES
    if mode == "positive":  # the cases reached the steering code, not just vLLM's own checks
        assert steering_answered > 0
    if os.environ.get("SAE_SERVE_FUZZ_OUT"):  # `make fuzz` records what it ran
        with open(os.environ["SAE_SERVE_FUZZ_OUT"], "a") as out:
            out.write(json.dumps({"bench": "fuzz", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "path": path, "mode": mode, "cases": cases, "steering_answered": steering_answered,
                                  "server_errors": 0}) + "\n")


def test_64_concurrent_steered_streams_equal_their_solo_runs(server, client) -> None:
    """A bounded loopback load: 64 streams with random specs at once; each equals its steered solo
    run, and each that steers differs from its prompt's unsteered run (so dropped steering fails)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    proc = server.proc
    c, model = client
    rng = random.Random(7)
    labels = ["non-english", "military", "soviet-russian", "city-name", "python-return"]
    jobs = []
    for i in range(64):
        spec = {"steering": {"interventions": [
            {"sae": "layer15", "feature": f, "mode": rng.choice(["clamp", "add"]),
             "value": round(rng.uniform(6, 10), 2)} for f in rng.sample(labels, rng.choice([0, 1, 1, 2]))]}}
        jobs.append((f"Request {i}: my favourite thing is", spec))

    def stream(job: tuple[str, dict]) -> str:
        prompt, spec = job
        chunks = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                      extra_body=spec)
        return "".join(ch.choices[0].text for ch in chunks)

    stream(jobs[0])  # warm
    before = server_rss(proc)
    with ThreadPoolExecutor(max_workers=64) as pool:
        together = list(pool.map(stream, jobs))
    solo = [stream(job) for job in jobs]
    unsteered = [stream((prompt, {})) for prompt, _ in jobs]
    assert together == solo
    steering = [i for i, (_, spec) in enumerate(jobs) if spec["steering"]["interventions"]]
    assert len(steering) > 32
    assert all(together[i] != unsteered[i] for i in steering), [jobs[i] for i in steering
                                                                if together[i] == unsteered[i]]
    assert all(together[i] == unsteered[i] for i in set(range(64)) - set(steering))
    growth = server_rss(proc) - before
    assert growth < 300 * 2**20, f"server memory grew by {growth / 2**20:.0f} MiB"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client) -> None:
    import httpx

    base = server.base
    c, model = client
    body = {"model": model, "prompt": "Tell me a story.", "max_tokens": 400, "min_tokens": 400, "stream": True,
            **FRENCH}
    generated = metric(base, "vllm:generation_tokens_total")
    with httpx.Client(timeout=30, headers=AUTH) as http, \
            http.stream("POST", base + "/v1/completions", json=body) as response:
        next(response.iter_lines())  # one chunk, then hang up
    deadline, running = time.time() + 120, 1.0
    while time.time() < deadline and running:
        time.sleep(1)
        running = metric(base, "vllm:num_requests_running")
    assert running == 0
    # counted in tokens, not seconds: run to its end, the abandoned request would have generated 400
    assert metric(base, "vllm:generation_tokens_total") - generated < 400
    ok = c.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert ok.choices[0].text.startswith(" Paris")




def _when_idle(base: str) -> None:
    """Wait until vLLM runs no request, then run one step (the workers expire readouts at steps)."""
    deadline = time.time() + 60
    while time.time() < deadline and metric(base, "vllm:num_requests_running") + metric(
            base, "vllm:num_requests_waiting"):
        time.sleep(0.5)


async def _many(n: int, one, concurrency: int = 32) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> None:
        async with gate:
            await one(i)

    await asyncio.gather(*(gated(i) for i in range(n)))


def test_500_aborted_reading_streams_and_500_injected_keys_leave_worker_memory_flat(server, client) -> None:
    import httpx

    base, proc = server.base, server.proc
    c, model = client
    c.completions.create(model=model, prompt="warm", max_tokens=2, extra_body={
        "return_features": {"sae": "layer15", "top_k": 8}})
    rss = server_rss(proc)

    async def abort(http, i: int) -> None:  # a reading stream, abandoned after its first event
        body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": 300, "stream": True,
                "return_features": {"sae": "layer15", "top_k": 8}}
        async with http.stream("POST", base + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    break

    async def inject(http, i: int) -> None:  # keys of its own choosing, straight to the workers
        spec = '{"return_features": {"sae": "layer15", "top_k": 64}}'
        body = {"model": model, "prompt": f"Note {i}", "max_tokens": 2,
                "vllm_xargs": {"sae_serve": spec, "sae_serve_key": f"injected-{i}"}}
        assert (await http.post(base + "/v1/completions", json=body)).status_code == 200

    async def run(one) -> None:
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            await _many(500, lambda i: one(http, i))

    rejected = metric(base, "sae_serve_rejected_specs_total", reason="unauthenticated")
    for one in (abort, inject):
        asyncio.run(run(one))
    assert metric(base, "sae_serve_rejected_specs_total", reason="unauthenticated") == rejected + 500
    _when_idle(base)
    time.sleep(2.5)  # the test server's readout_ttl_s is 2
    c.completions.create(model=model, prompt="The capital of France is", max_tokens=2)
    assert metric(base, "sae_serve_pending_readout_bytes") == 0
    growth = server_rss(proc) - rss
    assert growth < 200 * 2**20, f"server memory grew by {growth / 2**20:.0f} MiB"
