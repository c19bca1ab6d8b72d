"""The vLLM endpoint plugin: steering on the OpenAI-compatible API (vLLM's own server).

/v1/completions and /v1/chat/completions accept a top-level ``steering`` object,
``return_features``, ``return_hidden_states`` and ``guardrails`` (the openai client sends them
with ``extra_body``); the route validates and
admits them (``service.py``), hands vLLM the signed spec through ``vllm_xargs`` and a keyed
``cache_salt``, calls vLLM's own handler, and adds an ``sae`` object to the response: the steering
applied (clamp values resolved) and, when asked, per-token feature activations and hidden states.
In a stream, each chunk carries the activations and states of the tokens computed since the
previous chunk, and the final chunk
(the one with a finish_reason) also the steering applied. A request a worker failed is never a
success: a 500, or in a stream an error event. GET /v1/saes and /v1/features/{sae}/{feature}
describe what is loaded. Other routes take no steering: a spec smuggled in their ``vllm_xargs``
is unsigned, and the workers ignore it.
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
from sae_serve.engines.protocol import PREFIX
from sae_serve.engines.vllm_releases import replace_route
from sae_serve.errors import SpecError, WorkerError
from sae_serve.server.fan_out import Part, merge, sequence_count, split, unsplittable
from sae_serve.server.http_errors import error_body, spec_status
from sae_serve.server.service import (
    GUARDRAIL_STOP,
    Collected,
    PreparedRequest,
    SteeringService,
    hidden_states_json,
)
from sae_serve.server.unsteered_routes import SAE_FIELDS, UnsteeredRoutes
from sae_serve.steering.spec import FeatureReadoutSpec, Guardrail, HiddenStatesSpec, SteeringSpec

STEERING_DOC = "sae_serve: feature steering of this request (clamp / add / scale features, add vectors)."
READOUT_DOC = "sae_serve: return per-token feature activations of one SAE."
HIDDEN_DOC = ("sae_serve: return the residual stream after these decoder layers (before any steering there), "
              "base64 little-endian.")
GUARDRAILS_DOC = ("sae_serve: rules on a feature or probe that steer, abort (finish_reason content_filter) or flag "
                  "this request when they fire.")


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param))


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
        return_features=(SkipValidation[FeatureReadoutSpec | None], Field(default=None, description=READOUT_DOC)),
        guardrails=(SkipValidation[list[Guardrail] | None], Field(default=None, description=GUARDRAILS_DOC)),
        return_hidden_states=(SkipValidation[HiddenStatesSpec | None], Field(default=None, description=HIDDEN_DOC)))

    async def route(request: Steered, raw_request: Request) -> Response:  # type: ignore[valid-type]
        service: SteeringService = raw_request.app.state.sae_serve
        fields = {name: getattr(request, name) for name in SAE_FIELDS}
        try:
            prepared = service.prepare(service.parse({k: v for k, v in fields.items() if v is not None}),
                                       client_salt=request.cache_salt, fan_out=unsplittable(request),
                                       sequences=sequence_count(request))
        except SpecError as exc:
            return _error(spec_status(exc), str(exc), exc.field)
        if prepared is None:
            return await vllm_handler(request, raw_request)
        if prepared.aborts and (field := _structured(request)) is not None:  # a grammar refuses an early EOS: a 500
            return _error(400, f"{field} cannot be combined with guardrails that abort (this server's own "
                          "included): the grammar would refuse the end of sequence an abort emits", field)
        parts = split(request) if prepared.per_sequence else [Part(request, 0, 0)]
        each = service.admit_sequences(prepared, len(parts), request.cache_salt)
        answers = [_answer(vllm_handler, part.request, raw_request, one) for part, one in zip(parts, each, strict=True)]
        if len(parts) == 1:
            return await answers[0]
        return await merge(parts, answers)  # type: ignore[return-value]

    return route


async def _answer(vllm_handler: Callable[..., Awaitable[Response]], request: Any, raw_request: Request,
                  prepared: PreparedRequest) -> Response | None:
    """vLLM's answer to one admitted request, with its ``sae`` object (and content_filter endings)."""
    service: SteeringService = raw_request.app.state.sae_serve
    engine_client = raw_request.app.state.engine_client
    # A client's own sae_serve* keys beside ours would void the signature: theirs go.
    xargs = {k: v for k, v in (request.vllm_xargs or {}).items() if not k.startswith(PREFIX)}
    request.vllm_xargs = {**xargs, **prepared.engine.extra_args}
    request.cache_salt = prepared.engine.cache_salt
    try:
        response = await vllm_handler(request, raw_request)
    except BaseException:
        await service.discard(engine_client, prepared)
        raise
    if isinstance(response, StreamingResponse):
        response.body_iterator = _with_sae(response.body_iterator, service, prepared, engine_client)
        return response
    if not isinstance(response, JSONResponse) or response.status_code != 200:
        await service.discard(engine_client, prepared)
        return response
    body = json.loads(response.body)
    try:
        collected = await service.collect(engine_client, prepared)
    except WorkerError as exc:
        answer = _error(500, str(exc), None)
    else:
        if (sae := service.response_object(prepared, collected)) is not None:
            body["sae"] = sae
        _mark_aborted(body, collected, service)
        answer = JSONResponse(content=body, headers={k: v for k, v in response.headers.items()
                                                     if k.lower() not in ("content-length", "content-type")})
    answer.background = response.background  # vLLM's own tasks after the answer (--enable-server-load-tracking)
    return answer


def _mark_aborted(body: dict[str, Any], collected: Collected, service: SteeringService) -> None:
    """A guardrail's abort ends the choice with OpenAI's content_filter (vLLM saw the stop token)."""
    for choice in body.get("choices", []):
        if service.ended_by_guardrail(collected, choice.get("finish_reason"), choice.get("stop_reason")):
            choice["finish_reason"], choice["stop_reason"] = GUARDRAIL_STOP, None


def _structured(request: Any) -> str | None:
    """The field that makes vLLM constrain the output to a grammar, if any."""
    response_format = getattr(request, "response_format", None)
    if response_format is not None and getattr(response_format, "type", "text") != "text":
        return "response_format"
    if getattr(request, "structured_outputs", None) is not None:
        return "structured_outputs"
    tool_choice = getattr(request, "tool_choice", None)
    if getattr(request, "tools", None) and tool_choice not in (None, "none", "auto"):
        return "tool_choice"
    return None


async def _with_sae(chunks: AsyncIterator[Any], service: SteeringService, prepared: Any,
                    engine_client: Any) -> AsyncIterator[str]:
    """Pass SSE events through, adding an ``sae`` object: to each event, the activations and hidden
    states of the tokens computed since the previous one (when the request asked for them); to the first event with a
    finish_reason, the steering applied and the rest of the activations. The first event and the
    last are checked for a worker's error (a request that only steers parses just those two); an
    error ends the stream with an error event, as vLLM ends a stream that fails."""
    finished, checked = False, False
    try:
        async for chunk in chunks:
            text = chunk if isinstance(chunk, str) else chunk.decode()
            events = text.split("\n\n")
            for i, event in enumerate(events):
                if finished or not event.startswith("data: {"):
                    continue
                final = '"finish_reason":"' in event.replace(" ", "")
                if not prepared.reads and checked and not final:
                    continue
                body = json.loads(event.removeprefix("data: "))
                finished = any(choice.get("finish_reason") for choice in body.get("choices", []))
                try:
                    collected = await service.collect(engine_client, prepared)
                except WorkerError as exc:
                    finished = True
                    yield f"data: {json.dumps(error_body(500, str(exc), None))}\n\ndata: [DONE]\n\n"
                    return
                checked = True
                if finished:
                    if (sae := service.response_object(prepared, collected)) is not None:
                        body["sae"] = sae
                    _mark_aborted(body, collected, service)
                elif (collected.features and collected.features["tokens"]) or collected.hidden_states:
                    body["sae"] = {"features": collected.features}
                    if collected.hidden_states is not None:
                        body["sae"]["hidden_states"] = hidden_states_json(collected.hidden_states)
                else:
                    continue
                events[i] = "data: " + json.dumps(body)
            yield "\n\n".join(events)
    finally:
        if not finished:  # the client hung up, or the stream failed: end vLLM's request, drop what the workers hold
            await chunks.aclose()  # type: ignore[attr-defined]
            await service.discard(engine_client, prepared)


class SaeServeEndpoints:
    """The ``vllm.endpoint_plugins`` object (enable it with VLLM_PLUGINS=sae_serve)."""

    name = "sae_serve"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from vllm.entrypoints.openai.chat_completion.api_router import create_chat_completion
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.api_router import create_completion
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        replace_route(app, "POST", "/v1/completions")(_steered_route(CompletionRequest, create_completion))
        replace_route(app, "POST", "/v1/chat/completions")(_steered_route(ChatCompletionRequest,
                                                                          create_chat_completion))

        @app.get("/v1/saes")
        async def list_saes(raw_request: Request) -> dict[str, Any]:
            return {"object": "list", "data": raw_request.app.state.sae_serve.saes()}

        @app.get("/v1/features/{sae}/{feature}")
        async def get_feature(sae: str, feature: str, raw_request: Request) -> Response:
            service: SteeringService = raw_request.app.state.sae_serve
            try:
                return JSONResponse(service.feature(sae, service.path_ref(feature)))
            except SpecError as exc:
                return _error(404, str(exc), exc.field)

        from sae_serve.server.ui import attach_ui

        attach_ui(app)
        app.add_middleware(UnsteeredRoutes)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        config = config_from_env()
        if config is None or envs.deployment_secret() is None:
            raise RuntimeError("sae_serve endpoint plugin: set SAE_SERVE_CONFIG and SAE_SERVE_SECRET in every "
                               "process of the server (sae-serve serve does)")
        state.sae_serve = service = SteeringService(config)
        if engine_client is None:
            return
        await service.learn_capabilities(engine_client)
        address = envs.grpc_address()
        if address is not None:
            from sae_serve.server.grpc_server import start_grpc

            state.sae_serve_grpc = await start_grpc(service, engine_client, *address, api_keys=api_keys(args))


def api_keys(args: Namespace) -> tuple[str, ...]:
    """vLLM's HTTP keys: --api-key, else the VLLM_API_KEY environment variable."""
    return tuple(k for k in (getattr(args, "api_key", None) or [envs.vllm_api_key()]) if k)
