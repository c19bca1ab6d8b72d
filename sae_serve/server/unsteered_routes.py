"""vLLM's other text-generating routes (the Responses API, Anthropic's /v1/messages, SageMaker's
/invocations...): steering is taken on /v1/completions and /v1/chat/completions (and gRPC) only.

On the others a request that names a sae_serve field gets a 400 naming it, rather than a silently
unsteered answer. (The server's own guardrails run there too: the workers apply them to every
request, whatever route it came by.)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

from sae_serve.errors import SpecError
from sae_serve.server.http_errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The POST routes of vLLM 0.26 to 0.32 that generate text without going through ours.
UNSTEERED_ROUTES = frozenset({
    "/v1/responses", "/v1/messages", "/v1/chat/completions/batch", "/cohere/v2/chat", "/invocations",
    "/inference/v1/generate", "/generative_scoring", "/v1/systemone",
})
SAE_FIELDS = ("steering", "return_features", "guardrails", "return_hidden_states")  # what our routes add
STEERED_ROUTES = "/v1/completions and /v1/chat/completions (or gRPC)"


def check(path: str, body: bytes) -> SpecError | None:
    """Why a POST to ``path`` with ``body`` is refused, if it is."""
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):  # vLLM's route answers a body that is not JSON (or nests too deep)
        return None
    named = next((name for name in SAE_FIELDS if name in fields), None) if isinstance(fields, dict) else None
    return None if named is None else SpecError(named, f"{path} does not steer: send {named} to {STEERED_ROUTES}")


class UnsteeredRoutes:
    """ASGI middleware: refuses what ``check`` refuses on ``UNSTEERED_ROUTES``, before vLLM reads it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope)
        if scope["type"] != "http" or scope["method"] != "POST" or path not in UNSTEERED_ROUTES:
            return await self.app(scope, receive, send)
        messages = []
        while True:  # the whole body: it is read again below, by vLLM's route
            messages.append(message := await receive())
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        refused = check(path, b"".join(m.get("body", b"") for m in messages))
        if refused is not None:
            if (service := getattr(scope["app"].state, "sae_serve", None)) is not None:
                service.metrics.refused.labels("invalid").inc()
            response = JSONResponse(error_body(400, str(refused), refused.field), status_code=400)
            return await response(scope, receive, send)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _route_path(scope: Scope) -> str:
    """The path the routes match: without the server's root path (cut only at a ``/``, as Starlette does)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
        return path[len(root):]
    return path

