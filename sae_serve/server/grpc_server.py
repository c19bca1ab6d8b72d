"""The gRPC service of protos/sae_serve.proto, served from inside vLLM's API server process on
the same engine client as HTTP, with the same service layer (validation, policy, metrics)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sae_serve import envs
from sae_serve.engines.vllm_releases import client_error
from sae_serve.errors import PolicyError, SpecError, WorkerError
from sae_serve.server.grpc_stubs import load
from sae_serve.server.service import GUARDRAIL_STOP, SteeringService

logger = logging.getLogger(__name__)
pb, pb_grpc = load()
MODES = {pb.CLAMP: "clamp", pb.ADD: "add", pb.SCALE: "scale"}
MODE_OF = {name: mode for mode, name in MODES.items()}
POSITIONS = {pb.ALL: "all", pb.PROMPT: "prompt", pb.GENERATED: "generated"}
ACTIONS = {pb.STEER: "steer", pb.ABORT: "abort", pb.FLAG: "flag"}
ACTION_OF = {name: action for action, name in ACTIONS.items()}


def _ref(ref: Any) -> int | str | None:
    kind = ref.WhichOneof("ref")
    return None if kind is None else getattr(ref, kind)


def _intervention(iv: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"sae": iv.sae, "feature": _ref(iv.feature), "mode": MODES.get(iv.mode, "unspecified")}
    for name in ("value", "multiple_of_max"):
        if iv.HasField(name):
            out[name] = getattr(iv, name)
    return out


def _steering(s: Any) -> dict[str, Any]:
    return {"interventions": [_intervention(iv) for iv in s.interventions],
            "vectors": [{"name": v.name, "coefficient": v.coefficient} for v in s.vectors],
            "positions": POSITIONS.get(s.positions, "unspecified")}


def _guardrail(g: Any) -> dict[str, Any]:
    when, kind = g.when, g.when.above.WhichOneof("kind")
    trigger: dict[str, Any] = {"probe": when.probe} if when.probe else {}
    if when.sae or when.HasField("feature") or not when.probe:  # both sent: the same error as HTTP
        trigger |= {"sae": when.sae, "feature": _ref(when.feature)}
    trigger["above"] = {kind: getattr(when.above, kind)} if kind else {}
    trigger |= {name: getattr(when, name) for name in ("tokens", "window") if getattr(when, name)}
    if when.HasField("positions"):
        trigger["positions"] = POSITIONS.get(when.positions, "unspecified")
    rule = {"name": g.name, "when": trigger, "action": ACTIONS.get(g.action, "unspecified")}
    return rule | ({"steering": _steering(g.steering)} if g.HasField("steering") else {})


def request_body(request: Any) -> dict[str, Any]:
    """The proto request as the same JSON body HTTP takes (so the same errors name the field)."""
    body: dict[str, Any] = {}
    if request.HasField("steering"):
        body["steering"] = _steering(request.steering)
    if request.guardrails:
        body["guardrails"] = [_guardrail(g) for g in request.guardrails]
    if request.HasField("return_hidden_states"):
        h = request.return_hidden_states
        if h.positions and h.position_list:
            raise SpecError("return_hidden_states.position_list", "set positions or position_list, not both")
        positions: str | list[int] = list(h.position_list) if h.position_list else (h.positions or "last")
        body["return_hidden_states"] = {"layers": list(h.layers), "positions": positions,
                                        "dtype": h.dtype or "float32"}
    if request.HasField("return_features"):
        r = request.return_features
        body["return_features"] = {"sae": r.sae, **({"top_k": r.top_k} if r.HasField("top_k") else {}),
                                   **({"features": [_ref(f) for f in r.features]} if r.features else {})}
    return body


class SaeServeServicer(pb_grpc.SaeServeServicer):
    def __init__(self, service: SteeringService, engine_client: Any) -> None:
        self.service = service
        self.engine = engine_client
        self.draining = False  # the server is shutting down: no new generations

    async def _prepare(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return self.service.prepare(self.service.parse(request_body(request)))
        except PolicyError as exc:
            code = grpc.StatusCode.PERMISSION_DENIED if exc.forbidden else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        except SpecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if not request.prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty")
        max_tokens = request.max_tokens or 16
        if request.min_tokens > max_tokens:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"min_tokens: {request.min_tokens} exceeds "
                                f"max_tokens {max_tokens}")
        if request.temperature < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature: must be >= 0")
        prepared = await self._prepare(request, context)
        sent, finished = 0, False
        try:
            async for message in self._generate(request, max_tokens, prepared):
                sent += 1
                finished = bool(message.finish_reason)
                yield message
        except WorkerError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except Exception as exc:
            # vLLM's own checks (temperature, a prompt longer than the context) fail before any output.
            if isinstance(exc, client_error()) or (isinstance(exc, ValueError | TypeError) and not sent):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        finally:
            if prepared is not None and not finished:  # cancelled or failed: drop what the workers hold
                await self.service.discard(self.engine, prepared)

    async def _generate(self, request: Any, max_tokens: int, prepared: Any) -> AsyncIterator[Any]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, min_tokens=request.min_tokens,
                                temperature=request.temperature,
                                seed=request.seed if request.HasField("seed") else None,
                                extra_args=dict(prepared.engine.extra_args) if prepared else None)
        prompt = prepared.engine.prompt(request.prompt) if prepared else {"prompt": request.prompt}
        sent_text, sent_tokens = 0, 0
        # A cancelled or timed-out call cancels this generator, and vLLM aborts the request.
        async for output in self.engine.generate(prompt, params, f"grpc-{uuid.uuid4().hex}"):
            completion = output.outputs[0]
            message = pb.GenerateResponse(text=completion.text[sent_text:],
                                          token_ids=list(completion.token_ids[sent_tokens:]))
            first = sent_tokens == 0
            sent_text, sent_tokens = len(completion.text), len(completion.token_ids)
            if output.finished:
                message.finish_reason = completion.finish_reason or ""
            # A request that only steers is checked for a worker's error on its first and last message.
            if prepared is not None and (prepared.reads or first or output.finished):
                await self._attach(message, prepared, output.finished, completion.stop_reason)
            yield message

    async def _attach(self, message: Any, prepared: Any, finished: bool, stop_reason: object = None) -> None:
        """Activations of the tokens computed since the previous message; the steering applied and
        the guardrails fired at the end."""
        collected = await self.service.collect(self.engine, prepared)
        if finished:
            for a in prepared.applied:
                message.applied.add(sae=a.sae, feature=a.feature, label=a.label or "", mode=MODE_OF[a.mode],
                                    value=a.value)
            for f in collected.guardrails:
                message.guardrails.add(name=f["name"], action=ACTION_OF[f["action"]], token_index=f["token_index"])
            if self.service.ended_by_guardrail(collected, message.finish_reason, stop_reason):
                message.finish_reason = GUARDRAIL_STOP
        for h in collected.hidden_states or ():
            message.hidden_states.add(layer=h.layer, positions=h.positions, dtype=h.dtype, shape=h.shape, data=h.data)
        features = collected.features
        if features is not None:
            message.features_sae = features["sae"]
            for token in features["tokens"]:
                entry = message.features.add(position=token["position"])
                for f in token["features"]:
                    entry.features.add(feature=f["feature"], label=f["label"] or "", activation=f["activation"])

    async def ListSaes(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ListSaesResponse(saes=[
            pb.SaeInfo(name=s["name"], architecture=s["architecture"], d_in=s["d_in"], d_sae=s["d_sae"],
                       hook_layer=s["hook_layer"], hook_point=s["hook_point"],
                       watchlist=[w["feature"] for w in s["watchlist"]]) for s in self.service.saes()])

    async def GetFeature(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ref = _ref(request.feature)
        try:
            if ref is None:
                raise SpecError("feature", "name the feature by index or label")
            card = self.service.feature(request.sae, ref)
        except SpecError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND if exc.field in ("sae", "feature") else
                                grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        feature = pb.Feature(sae=card["sae"], feature=card["feature"], label=card["label"] or "",
                             tags=list(card["tags"]), description=card["description"] or "")
        for name in ("max_activation", "density"):
            if card[name] is not None:
                setattr(feature, name, card[name])
        return feature


async def _parse(raw: bytes, request_cls: Any, context: grpc.aio.ServicerContext) -> Any:
    """Decode a request ourselves: grpc would answer a corrupt message with UNKNOWN."""
    try:
        return request_cls.FromString(raw)
    except DecodeError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_cls.DESCRIPTOR.full_name}: {exc}")


def _handlers(servicer: SaeServeServicer) -> grpc.GenericRpcHandler:
    async def generate(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for message in servicer.Generate(await _parse(raw, pb.GenerateRequest, context), context):
            yield message

    async def list_saes(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await servicer.ListSaes(await _parse(raw, pb.ListSaesRequest, context), context)

    async def get_feature(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await servicer.GetFeature(await _parse(raw, pb.GetFeatureRequest, context), context)

    return grpc.method_handlers_generic_handler("sae_serve.v1.SaeServe", {
        "Generate": grpc.unary_stream_rpc_method_handler(
            generate, response_serializer=pb.GenerateResponse.SerializeToString),
        "ListSaes": grpc.unary_unary_rpc_method_handler(
            list_saes, response_serializer=pb.ListSaesResponse.SerializeToString),
        "GetFeature": grpc.unary_unary_rpc_method_handler(
            get_feature, response_serializer=pb.Feature.SerializeToString),
    })


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The HTTP server's API keys on gRPC: metadata ``authorization: Bearer <key>``. Health checking
    and reflection stay open, as vLLM leaves /health open (probes send no keys)."""

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "authorization: send metadata 'authorization: Bearer <API key>'")

        self.deny = grpc.unary_unary_rpc_method_handler(deny)

    def _allowed(self, metadata: Any) -> bool:
        value = dict(metadata or ()).get("authorization", "")
        scheme, _, token = value.partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        # Compare with every key, in constant time, like vLLM's HTTP middleware.
        return scheme.lower() == "bearer" and any([hmac.compare_digest(digest, d) for d in self.digests])

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(self.OPEN) or self._allowed(details.invocation_metadata):
            return await continuation(details)
        return self.deny


def _drain_on_shutdown(engine_client: Any, server: grpc.aio.Server, servicer: SaeServeServicer,
                       health_servicer: Any, names: tuple[str, ...]) -> None:
    """On SIGTERM vLLM's server calls ``engine_client.shutdown`` (from a thread), which drains or
    aborts the engine's requests. Before that, readiness turns NOT_SERVING and new Generate calls
    are refused (UNAVAILABLE) while the calls in flight finish as the engine lets them; probes still
    reach the health service. Once the engine has stopped, so does the gRPC server."""
    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
    original = engine_client.shutdown
    stopped: list[Any] = []

    async def stop_serving() -> None:
        servicer.draining = True
        for name in names:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def shutdown(*args: Any, **kwargs: Any) -> Any:
        # The first call comes from vLLM's signal handling, in a thread; later ones (vLLM calls it
        # again on its way out, on the loop's own thread) must not wait on the loop.
        if stopped or not loop.is_running() or threading.get_ident() == loop_thread:
            return original(*args, **kwargs)
        asyncio.run_coroutine_threadsafe(stop_serving(), loop).result(timeout=10)
        try:
            return original(*args, **kwargs)
        finally:
            stopped.append(asyncio.run_coroutine_threadsafe(server.stop(grace=5), loop))

    engine_client.shutdown = shutdown


async def start_grpc(service: SteeringService, engine_client: Any, host: str, port: int,
                     api_keys: tuple[str, ...] = ()) -> grpc.aio.Server:
    """Start the gRPC server (SaeServe, health, reflection) on ``host:port``; with ``api_keys``, SaeServe
    calls must carry one of them. It stops serving (readiness first) when vLLM shuts down."""
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(api_keys)] if api_keys else [])
    servicer = SaeServeServicer(service, engine_client)
    server.add_generic_rpc_handlers((_handlers(servicer),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["SaeServe"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    server.add_insecure_port(f"{host}:{port}")
    if (reservation := envs.grpc_reservation()) is not None:
        os.close(reservation)  # gRPC holds the port now
        del os.environ[envs.GRPC_RESERVATION_VAR]
    await server.start()
    for name in ("", names[0]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _drain_on_shutdown(engine_client, server, servicer, health_servicer, ("", names[0]))
    logger.info("sae_serve gRPC on %s:%d", host, port)
    return server
