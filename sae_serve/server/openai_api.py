"""The vLLM endpoint plugin: steering on the OpenAI-compatible API (vLLM's own server).

/v1/completions and /v1/chat/completions accept a top-level ``steering`` object and
``return_features`` (the openai client sends them with ``extra_body``); the route validates them,
hands vLLM the spec through ``vllm_xargs`` and a ``cache_salt``, calls vLLM's own handler, and
adds an ``sae`` object to the response: the steering applied (clamp values resolved) and, when
asked, per-token feature activations. In a stream, each chunk carries the activations of the tokens
computed since the previous chunk, and the final chunk (the one with a finish_reason) also the
steering applied. GET /v1/saes and /v1/features/{sae}/{feature} describe what is loaded.
"""


import json
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, SkipValidation, create_model, model_validator

from sae_serve import envs
from sae_serve.config import config_from_env
from sae_serve.errors import PolicyError, SpecError
from sae_serve.server.service import SteeringService
from sae_serve.steering.spec import FeatureReadoutSpec, SteeringSpec

STEERING_DOC = "sae_serve: feature steering of this request (clamp / add / scale features, add vectors)."
READOUT_DOC = "sae_serve: return per-token feature activations of one SAE."


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": "BadRequestError", "param": param, "code": status}})


@model_validator(mode="before")
@classmethod
def _objects_are_objects(cls: type, data: Any) -> Any:
    """vLLM 0.32's own before-validators call .get() on ``structured_outputs`` and answer a non-object
    with a 500 (found by schemathesis); refuse it first, as the 400 it is. (Runs before the base's.)"""
    if isinstance(data, dict) and not isinstance(data.get("structured_outputs", {}), dict | None):
        raise ValueError("structured_outputs: must be an object")
    return data


def _steered_route(base: type, vllm_handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """A route taking ``base``'s body plus our two fields, then calling vLLM's handler."""

    # Documented in /openapi.json, validated by the service (one error format, counted in metrics).
    Steered = create_model(
        f"Steered{base.__name__}", __base__=base, __validators__={"_objects": _objects_are_objects},
        steering=(SkipValidation[SteeringSpec | None], Field(default=None, description=STEERING_DOC)),
        return_features=(SkipValidation[FeatureReadoutSpec | None], Field(default=None, description=READOUT_DOC)))

    async def route(request: Steered, raw_request: Request) -> Response:  # type: ignore[valid-type]
        service: SteeringService = raw_request.app.state.sae_serve
        try:
            prepared = service.prepare(service.parse({"steering": request.steering,
                                                      "return_features": request.return_features}))
        except SpecError as exc:
            return _error(403 if isinstance(exc, PolicyError) and exc.forbidden else 400, str(exc), exc.field)
        if prepared is None:
            return await vllm_handler(request, raw_request)
        request.vllm_xargs = {**(request.vllm_xargs or {}), **prepared.engine.extra_args}
        if prepared.engine.cache_salt is not None:
            request.cache_salt = prepared.engine.cache_salt
        response = await vllm_handler(request, raw_request)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _with_sae(response.body_iterator, service, prepared,
                                                 raw_request.app.state.engine_client)
            return response
        if not isinstance(response, JSONResponse) or response.status_code != 200:
            return response
        body = json.loads(response.body)
        features = await service.activations(raw_request.app.state.engine_client, prepared)
        body["sae"] = service.response_object(prepared, features)
        return JSONResponse(content=body, headers={k: v for k, v in response.headers.items()
                                                   if k.lower() not in ("content-length", "content-type")})

    return route


async def _with_sae(chunks: AsyncIterator[Any], service: SteeringService, prepared: Any,
                    engine_client: Any) -> AsyncIterator[str]:
    """Pass SSE events through, adding an ``sae`` object: to each event, the activations of the tokens
    computed since the previous one (when the request asked for them); to the first event with a
    finish_reason, the steering applied and the rest of the activations."""
    finished = False
    async for chunk in chunks:
        text = chunk if isinstance(chunk, str) else chunk.decode()
        events = text.split("\n\n")
        for i, event in enumerate(events):
            if finished or not event.startswith("data: {"):
                continue
            if prepared.readout_sae is None and '"finish_reason":"' not in event.replace(" ", ""):
                continue  # a request that only steers needs only its final event parsed
            body = json.loads(event.removeprefix("data: "))
            finished = any(choice.get("finish_reason") for choice in body.get("choices", []))
            features = await service.activations(engine_client, prepared)
            if finished:
                body["sae"] = service.response_object(prepared, features)
            elif features is not None and features["tokens"]:
                body["sae"] = {"features": features}
            else:
                continue
            events[i] = "data: " + json.dumps(body)
        yield "\n\n".join(events)


class SaeServeEndpoints:
    """The ``vllm.endpoint_plugins`` object (enable it with VLLM_PLUGINS=sae_serve)."""

    name = "sae_serve"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from vllm.entrypoints.openai.chat_completion.api_router import create_chat_completion
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.api_router import create_completion
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        app.post("/v1/completions")(_steered_route(CompletionRequest, create_completion))
        app.post("/v1/chat/completions")(_steered_route(ChatCompletionRequest, create_chat_completion))

        @app.get("/v1/saes")
        async def list_saes(raw_request: Request) -> dict[str, Any]:
            return {"object": "list", "data": raw_request.app.state.sae_serve.saes()}

        @app.get("/v1/features/{sae}/{feature}")
        async def get_feature(sae: str, feature: str, raw_request: Request) -> Response:
            try:
                return JSONResponse(raw_request.app.state.sae_serve.feature(sae, feature))
            except SpecError as exc:
                return _error(404, str(exc), exc.field)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        config = config_from_env()
        if config is None:
            raise RuntimeError("sae_serve endpoint plugin: set SAE_SERVE_CONFIG (sae-serve serve does)")
        state.sae_serve = SteeringService(config)
        address = envs.grpc_address()
        if address is not None and engine_client is not None:
            from sae_serve.server.grpc_server import start_grpc

            state.sae_serve_grpc = await start_grpc(state.sae_serve, engine_client, *address, api_keys=api_keys(args))


def api_keys(args: Namespace) -> tuple[str, ...]:
    """vLLM's HTTP keys: --api-key, else the VLLM_API_KEY environment variable."""
    return tuple(k for k in (getattr(args, "api_key", None) or [envs.vllm_api_key()]) if k)
