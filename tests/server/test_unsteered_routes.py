"""The guard on vLLM's routes that do not steer, as ASGI sees it: bodies in several chunks, a root
path, bodies that are not JSON objects. The servers' tests (test_adversarial.py) run it for real."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from sae_serve.server.unsteered_routes import UnsteeredRoutes


def _call(path: str, chunks: list[bytes], root_path: str = "") -> tuple[list[dict], bytes | None]:
    """(what the client was sent, the body vLLM's route read, or None when it was not reached)."""
    reached: list[bytes] = []

    async def route(scope, receive, send) -> None:  # reads the body as vLLM's route does
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        reached.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": root_path + path, "root_path": root_path,
             "app": SimpleNamespace(state=SimpleNamespace())}
    asyncio.run(UnsteeredRoutes(route)(scope, receive, send))
    return sent, (reached[0] if reached else None)


def test_a_steering_field_split_over_chunks_is_refused_and_any_other_body_reaches_vllm_whole() -> None:
    body = json.dumps({"model": "m", "input": "hi", "return_features": {"sae": "layer15"}}).encode()
    sent, reached = _call("/v1/responses", [body[:7], body[7:20], body[20:]])
    assert reached is None and sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error["param"] == "return_features" and error["code"] == 400
    plain = json.dumps({"model": "m", "input": "steering is a word here"}).encode()
    assert _call("/v1/responses", [plain[:5], plain[5:]])[1] == plain
    for odd in (b"[1, 2]", b"not json", b"[" * 100_000, b'"steering"'):  # vLLM's own answer to these
        assert _call("/v1/messages", [odd])[1] == odd


def test_the_routes_are_matched_below_the_servers_root_path() -> None:
    body = json.dumps({"steering": {}}).encode()
    assert _call("/v1/messages", [body], root_path="/api")[0][0]["status"] == 400
    assert _call("/v1/messages", [body], root_path="/")[0][0]["status"] == 400
    assert _call("/api/v1/messages", [body], root_path="/a")[1] == body  # cut at a "/" only, as Starlette routes
    assert _call("/v1/completions", [body])[1] == body  # ours: the steered route takes it
    assert _call("/v1/responses/abc/cancel", [body])[1] == body
