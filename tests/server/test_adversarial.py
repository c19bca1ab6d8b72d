"""A hostile client against the shared server: specs smuggled past the policy through vLLM's own
fields, on every route that takes a body; cache salts chosen to share or poison a steered prefix;
a client's own cache_salt as tenant isolation. Each attempt is ignored or refused, never applied."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from sae_serve.engines.protocol import REQUEST_KEY, SIGNATURE_KEY, SPEC_KEY
from sae_serve.steering.spec import RequestSpec, resolve
from tests.server.harness import AUTH, metric

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]
# Far past the policy (non-english is steerable up to 4x its max; 1000 is absurd): never to be applied.
STRONG = {"steering": {"interventions": [{"sae": "layer15", "feature": 4563, "mode": "clamp", "value": 1000.0}]}}
SMUGGLED = [
    {SPEC_KEY: json.dumps(STRONG)},
    {SPEC_KEY: json.dumps(STRONG), REQUEST_KEY: "mine"},
    {SPEC_KEY: json.dumps(STRONG), REQUEST_KEY: "mine", SIGNATURE_KEY: "0" * 64},
]
LONG_PROMPT = " ".join(["The history of the old harbour town is long and full of stories."] * 30)


def _routes(model: str) -> dict[str, tuple[dict, object]]:
    """Each route that takes a body with vllm_xargs: (a greedy request, how to read its text)."""
    say = "Tell me about your favourite food."
    return {
        "/v1/completions": ({"model": model, "prompt": "My favourite food is", "max_tokens": 8, "temperature": 0},
                            lambda r: r["choices"][0]["text"]),
        "/v1/chat/completions": ({"model": model, "messages": [{"role": "user", "content": say}], "max_tokens": 8,
                                  "temperature": 0}, lambda r: r["choices"][0]["message"]["content"]),
        "/v1/responses": ({"model": model, "input": say, "max_output_tokens": 8, "temperature": 0},
                          lambda r: json.dumps([o.get("content") for o in r["output"]])),
        "/v1/messages": ({"model": model, "messages": [{"role": "user", "content": say}], "max_tokens": 8,
                          "temperature": 0}, lambda r: json.dumps(r["content"])),
    }


def _takes_vllm_xargs(document: dict, path: str) -> bool:
    """Whether this vLLM's body for ``path`` has the vllm_xargs field (0.26's /v1/responses has not)."""
    content = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "properties" in content:
        return "vllm_xargs" in content["properties"]
    schemas = [content] if "$ref" in content else content.get("anyOf", content.get("oneOf", [content]))
    for schema in schemas:
        name = schema.get("$ref", "").rsplit("/", 1)[-1]
        if "vllm_xargs" in document["components"]["schemas"].get(name, {}).get("properties", {}):
            return True
    return False


def test_specs_smuggled_in_vllm_xargs_are_ignored_on_every_route(server, client) -> None:
    """Every smuggled spec is ignored; each one that reaches the workers (every route whose body
    has vllm_xargs) is counted there as unauthenticated, exactly once."""
    base = server.base
    _, model = client
    with httpx.Client(base_url=base, headers=AUTH, timeout=120) as http:
        document = http.get("/openapi.json").json()
        forwarded = 0
        for path, (body, text) in _routes(model).items():
            plain = http.post(path, json=body)
            if plain.status_code == 404:
                continue  # a route this vLLM does not serve
            assert plain.status_code == 200, (path, plain.text)
            rejected, served = metric(base, "sae_serve_rejected_specs_total", reason="unauthenticated"), 0
            for xargs in SMUGGLED:
                got = http.post(path, json={**body, "vllm_xargs": xargs})
                assert got.status_code == 200 and text(got.json()) == text(plain.json()), (path, xargs)
                served += 1
            # Beside a real steering field too: ours are signed, the client's are overwritten.
            if path == "/v1/completions":
                both = http.post(path, json={**body, "vllm_xargs": SMUGGLED[1], "steering": {"interventions": []}})
                assert text(both.json()) == text(plain.json())
                served += 1
            reached = served if _takes_vllm_xargs(document, path) else 0
            assert metric(base, "sae_serve_rejected_specs_total", reason="unauthenticated") == rejected + reached, path
            forwarded += reached
    assert forwarded >= 7  # completions and chat at least


def test_steering_sent_to_a_route_that_does_not_steer_is_a_400_naming_it(server, client) -> None:
    """Not a silently unsteered answer; the same body without it is served as vLLM serves it."""
    _, model = client
    with httpx.Client(base_url=server.base, headers=AUTH, timeout=120) as http:
        for path in ("/v1/responses", "/v1/messages"):
            body, _ = _routes(model)[path]
            if http.post(path, json=body).status_code == 404:
                continue  # a route this vLLM does not serve
            for field, value in (("steering", STRONG["steering"]), ("return_features", {"sae": "layer15"})):
                got = http.post(path, json={**body, field: value})
                assert got.status_code == 400 and got.json()["error"]["param"] == field, (path, got.text)
                assert f"{path} does not steer: send {field} to /v1/completions" in got.json()["error"]["message"]
        streamed = http.post("/v1/responses", json={**_routes(model)["/v1/responses"][0], "stream": True})
        assert streamed.status_code in (200, 404)  # a body read by the guard still reaches vLLM whole


def test_a_guessed_salt_cannot_poison_a_steered_prefix(server, client, reference) -> None:
    """Plain first with the salt a client could compute (the spec's hash, or any guess), then
    steered, then plain again: each equals its own solo run (the reference engine)."""
    c, model = client
    spec = {"steering": {"interventions": [{"sae": "layer15", "feature": "military", "mode": "add", "value": 8.0}]}}
    guessed = hashlib.sha256(RequestSpec.model_validate(spec).model_dump_json().encode()).hexdigest()[:32]

    def run(body: dict, salt: str | None = None) -> str:
        extra = {**body, **({"cache_salt": salt} if salt else {})}
        return c.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=8, temperature=0,
                                    extra_body=extra).choices[0].text

    plain_first = run({}, guessed)
    steered = run(spec)
    plain_after = run({})
    steered_again = run(spec)
    [want_plain, want_steered] = reference.generate(
        [LONG_PROMPT] * 2, [None, resolve(RequestSpec.model_validate(spec), reference.registry)], max_new_tokens=8)
    assert plain_first == plain_after == want_plain.text
    assert steered == steered_again == want_steered.text != want_plain.text


def test_a_clients_cache_salt_still_separates_tenants(server, client) -> None:
    """Steered alike, two tenants share no prefix blocks; one tenant's repeat does hit its own."""
    base = server.base
    c, model = client
    spec = {"steering": {"interventions": [{"sae": "layer15", "feature": "non-english", "mode": "clamp",
                                            "value": 2.0}]}}
    prompt = LONG_PROMPT.replace("harbour", "mountain")

    def hits_after(salt: str) -> float:
        before = metric(base, "vllm:prefix_cache_hits_total")
        c.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                             extra_body={**spec, "cache_salt": salt})
        return metric(base, "vllm:prefix_cache_hits_total") - before

    hits_after("tenant-a")
    assert hits_after("tenant-b") == 0
    assert hits_after("tenant-a") > 100
