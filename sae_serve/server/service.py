"""The service layer every API adapter calls: validate a request's steering, admit it (sign it for
the workers), collect its activations and errors, and describe the loaded SAEs and features.
Written once, so HTTP and gRPC enforce the same rules and build the same answers."""

from __future__ import annotations

import asyncio
import base64
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from sae_serve.config import SaeServeConfig
from sae_serve.engines.protocol import (
    CAPABILITIES,
    POP_READOUTS,
    EngineRequest,
    HiddenStates,
    Readout,
    WorkerCapabilities,
    WorkerReply,
    admit,
    deployment_secret,
    merge_replies,
    secret_id,
)
from sae_serve.errors import PolicyError, SaeServeError, SpecError, WorkerError, field_path
from sae_serve.metrics import ApiMetrics, api_metrics
from sae_serve.sae.registry import SaeRegistry, build_registry
from sae_serve.steering.spec import AppliedIntervention, RequestSpec, ResolvedRequest, resolve

GUARDRAIL_STOP = "content_filter"
"""The finish_reason of a request a guardrail aborted (OpenAI's, for output stopped by a filter)."""

FEATURE_INDEX = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class PreparedRequest:
    """What the engine needs for one request, and what the response reports."""

    engine: EngineRequest
    spec: RequestSpec
    """What was admitted (the server's rules included): each sequence of the request is admitted alike."""
    applied: tuple[AppliedIntervention, ...]
    readout_sae: str | None
    guarded: bool = False
    """It brought guardrails of its own (the response lists those that fired)."""
    asked: bool = True
    """The client asked for something (else only the server's own guardrails admitted it, and the
    response carries no ``sae`` object unless they are revealed and fired)."""
    aborts: bool = False
    """Some guardrail on it (its own or the server's) may abort it: vLLM must stop on the stop token."""
    reads_states: bool = False
    """It asked for hidden states."""
    watched: bool = False
    """Guardrails run on it (its own or the server's)."""
    counted: set[tuple[str, str]] = field(default_factory=set, compare=False)
    """The rules already counted in the metrics (a stream collects several times)."""
    delivered: dict[str | int, int] = field(default_factory=dict, compare=False)
    """The last position collected, by readout SAE and by hidden-state layer: a request preempted
    after a stream sent some computes them again, and they are not sent twice."""

    @property
    def reads(self) -> bool:
        """Its response carries per-token data (features or hidden states), collected as it goes."""
        return self.readout_sae is not None or self.reads_states

    @property
    def per_sequence(self) -> bool:
        """The workers keep state for it per sequence (readouts, guardrail triggers): each sequence
        of a request that runs several (``n``, a prompt list) needs its own key (``fan_out.py``)."""
        return self.reads or self.watched


@dataclass(frozen=True)
class Collected:
    """What the workers report for a request so far."""

    features: dict[str, Any] | None
    """The readout (None when the request does not read)."""
    guardrails: list[dict[str, Any]]
    """The rules that fired that the client may see: name, action and token_index (sequence position)."""
    aborted: bool
    """An abort rule (the request's or the server's) fired; ``SteeringService.ended_by_guardrail``
    tells whether that is what ended the output."""
    hidden_states: list[HiddenStates] | None = None
    """The hidden states computed since the last collect, by layer (None when the request reads none)."""


class SteeringService:
    def __init__(self, config: SaeServeConfig, metrics: ApiMetrics | None = None,
                 capabilities: WorkerCapabilities | None = None) -> None:
        if config.hidden_states.stop_after is not None:
            raise SaeServeError("config hidden_states.stop_after: the model would sample from an unfinished forward; "
                                "it is for harvesting (sae-serve harvest --engine vllm), never for a server")
        # The API process keeps SAEs on the CPU for validation and feature cards only.
        self.registry: SaeRegistry = build_registry(config)
        self.policy = config.policy
        self.limits = config.limits
        self.metrics = metrics or api_metrics()
        self.capabilities = capabilities
        """What the workers can run; learned from them at startup (``learn_capabilities``)."""
        self.server_guardrails = list(config.guardrails)
        self._pops: dict[str, asyncio.Future[WorkerReply]] = {}  # keys waiting for the next fetch
        self._fetches: set[asyncio.Future[None]] = set()  # fetches in flight (a task must be referenced)
        try:  # a bad rule in the config fails the server's start, naming it
            resolve(RequestSpec(server_guardrails=self.server_guardrails), self.registry)
        except SpecError as exc:
            raise SaeServeError(f"config guardrails: {exc}") from None

    async def learn_capabilities(self, engine_client: Any) -> WorkerCapabilities:
        caps = WorkerCapabilities.from_workers(await engine_client.collective_rpc(CAPABILITIES))
        if caps is None:
            raise SaeServeError("vLLM's workers loaded no SAEs: enable the general plugin in every process "
                                "(VLLM_PLUGINS=sae_serve) and give them the same SAE_SERVE_CONFIG")
        if caps.secret_id != secret_id(deployment_secret()):
            raise SaeServeError("vLLM's workers have another SAE_SERVE_SECRET than this API process")
        if self.server_guardrails:  # the server's own rules must run on every request, or the server not start
            try:
                caps.check(resolve(RequestSpec(server_guardrails=self.server_guardrails), self.registry), self.limits)
            except SpecError as exc:
                raise SaeServeError(f"config guardrails: {exc}") from None
        self.capabilities = caps
        return caps

    def parse(self, body: dict[str, Any]) -> RequestSpec:
        """A request's ``steering`` and ``return_features`` as a RequestSpec; SpecError naming the
        field (counted as refused), for every protocol alike."""
        try:
            return RequestSpec.model_validate(body)
        except ValidationError as exc:
            self.metrics.refused.labels("invalid").inc()
            err = exc.errors()[0]
            raise SpecError(field_path(err["loc"]), err["msg"]) from None

    def prepare(self, spec: RequestSpec, client_salt: str | None = None, fan_out: dict[str, int] | None = None,
                sequences: tuple[str, int] = ("n", 1)) -> PreparedRequest | None:
        """None for a request that neither steers nor reads; raises SpecError (PolicyError when the
        policy refuses it) naming the field. Counts steered and refused requests. ``fan_out``: the
        request's fields that make vLLM run several sequences under it, and how many (``n``,
        ``prompt_embeds`` beside other prompts, ``use_beam_search``) that cannot run as one request per
        sequence (``fan_out.py``); ``sequences``: how many it runs, as one request each when it reads
        or is watched, and the field that asks for them. The server's own guardrails join every request."""
        asked = bool(spec.steering or spec.return_features or spec.guardrails or spec.return_hidden_states)
        if self.server_guardrails:
            spec = spec.model_copy(update={"server_guardrails": self.server_guardrails})
        try:
            resolved = resolve(spec, self.registry)
            self.policy.check(spec, resolved, self.registry)
            self._check_upstream(resolved)
        except PolicyError as exc:
            self.metrics.refused.labels("policy_forbidden" if exc.forbidden else "policy_limit").inc()
            raise
        except SpecError:
            self.metrics.refused.labels("invalid").inc()
            raise
        if resolved.is_empty:
            return None
        try:
            self._check_capacity(resolved, fan_out or {}, sequences)
        except SpecError:
            self.metrics.refused.labels("capacity").inc()
            raise
        for mode in sorted({a.mode for a in resolved.applied} | ({"vector"} if resolved.vectors else set())):
            self.metrics.steered.labels(mode).inc()
        return PreparedRequest(admit(spec, client_salt), spec, resolved.applied,
                               spec.return_features.sae if spec.return_features else None,
                               guarded=bool(spec.guardrails), asked=asked,
                               aborts=any(rule.action == "abort" for rule in resolved.guardrails),
                               reads_states=resolved.hidden is not None, watched=bool(resolved.guardrails))

    @staticmethod
    def admit_sequences(prepared: PreparedRequest, count: int, client_salt: str | None) -> list[PreparedRequest]:
        """``prepared`` and ``count - 1`` more admissions of its spec, each under its own readout key:
        one per sequence of a request that runs several as separate engine requests."""
        again = (replace(prepared, engine=admit(prepared.spec, client_salt), counted=set(), delivered={})
                 for _ in range(count - 1))
        return [prepared, *again]

    def ended_by_guardrail(self, collected: Collected, finish_reason: str | None, stop_reason: object) -> bool:
        """Whether an output that finished so was ended by an abort rule (``WorkerCapabilities``)."""
        return self.capabilities is not None and self.capabilities.ended_by_guardrail(
            collected.aborted, finish_reason, stop_reason)

    def _check_upstream(self, resolved: ResolvedRequest) -> None:
        """The server's own triggers must read the stream as the model computes it: a request may not
        steer before them (an earlier layer, or another SAE of the same layer)."""
        layer = {name: loaded.sae.site_layer for name, loaded in self.registry.saes.items()}
        triggers = [(rule.site, layer[rule.site]) for rule in resolved.guardrails if rule.server]
        if not triggers:
            return
        edited = set(resolved.edits) | set(resolved.vectors)
        for rule in resolved.guardrails:
            edited |= set() if rule.server else set(rule.edits) | set(rule.vectors)
        for name in sorted(edited):
            if any(layer[name] < at or (layer[name] == at and name != site) for site, at in triggers):
                raise PolicyError("steering", f"SAE {name!r} may not be steered on this server: its guardrails read "
                                  f"the stream at layer {max(at for _, at in triggers)}, unsteered", forbidden=True)

    def _check_capacity(self, resolved: ResolvedRequest, fan_out: dict[str, int], sequences: tuple[str, int]
                        ) -> None:
        """What the workers could not run whole, or could hold only past the limits."""
        field, count = sequences
        if count > self.limits.max_sequences and (resolved.readout or resolved.hidden or resolved.guardrails):
            raise SpecError(field, f"{count} sequences that each read or are watched exceed this server's limit of "
                            f"{self.limits.max_sequences} per request (config limits.max_sequences)")
        if fan_out.get("use_beam_search"):  # vLLM's beam search builds its own sampling params: unsteered
            raise SpecError("use_beam_search", "steering, readouts and guardrails (this server's own included) do "
                            "not apply to beam search")
        for name, sequences in fan_out.items():
            for asked, reads in (("return_features", resolved.readout), ("return_hidden_states", resolved.hidden)):
                if reads is not None and sequences > 1:
                    raise SpecError(name, f"{asked} reads one sequence, and this asks for {sequences}: send "
                                    f"them as separate requests, or drop {asked}")
            if resolved.guardrails and sequences > 1:
                raise SpecError(name, f"guardrails watch one sequence (this server's own too), and this asks for "
                                f"{sequences} at once: send them as separate requests")
        if self.capabilities is not None:
            self.capabilities.check(resolved, self.limits)

    async def collect(self, engine_client: Any, prepared: PreparedRequest) -> Collected:
        """The request's readout so far (removed from the workers) as a JSON-ready object, and the
        guardrails fired so far (counted once each). Raises WorkerError (counted) when a worker failed it."""
        key = prepared.engine.key
        reply = await self._pop(engine_client, key)
        if reply.error is not None:
            self.metrics.refused.labels("worker_error").inc()
            raise WorkerError(f"the engine could not serve this request as admitted: {reply.error}")
        for fired in reply.guardrails:
            # A request's own rules count under one label: their names are the client's (unbounded).
            rule = fired["name"] if fired["server"] else "request"
            if (rule, fired["name"]) not in prepared.counted:
                prepared.counted.add((rule, fired["name"]))
                self.metrics.guardrail_triggered.labels(rule, fired["action"]).inc()
        shown = [{"name": f["name"], "action": f["action"], "token_index": f["position"]} for f in reply.guardrails
                 if not f["server"] or self.policy.reveal_server_guardrails]
        aborted = any(f["action"] == "abort" for f in reply.guardrails)
        states = [_unsent(prepared, h) for h in reply.hidden_states] if prepared.reads_states else None
        if prepared.readout_sae is None:
            return Collected(None, shown, aborted, states and [h for h in states if h.positions])
        got = reply.features.get(prepared.readout_sae)
        features = {"sae": prepared.readout_sae, "tokens": []}
        if got:
            features = self._tokens(prepared.readout_sae, got)
            mark = prepared.delivered.get(prepared.readout_sae, -1)
            features["tokens"] = [t for t in features["tokens"] if t["position"] > mark]
            if features["tokens"]:
                prepared.delivered[prepared.readout_sae] = features["tokens"][-1]["position"]
        return Collected(features, shown, aborted, states and [h for h in states if h.positions])

    async def discard(self, engine_client: Any, prepared: PreparedRequest) -> None:
        """Drop what the workers hold for a request that ended without its answer (aborted)."""
        await self._pop(engine_client, prepared.engine.key)

    async def _pop(self, engine_client: Any, key: str) -> WorkerReply:
        """``key``'s worker reply. Every key asked for while a fetch is being scheduled rides the same
        ``collective_rpc``: the streams of one engine step ask together, and each call runs
        between the engine's steps, so one call per step instead of one per stream."""
        if not self._pops:  # (the task starts on the loop's next turn: the keys asked until then join)
            fetch = asyncio.ensure_future(self._fetch(engine_client))
            self._fetches.add(fetch)
            fetch.add_done_callback(self._fetches.discard)
        future = self._pops.setdefault(key, asyncio.get_running_loop().create_future())
        return await asyncio.shield(future)  # a caller that is cancelled leaves the others their reply

    async def _fetch(self, engine_client: Any) -> None:
        pops, self._pops = self._pops, {}
        keys = list(pops)
        try:
            replies = merge_replies(await engine_client.collective_rpc(POP_READOUTS, args=(keys,)), keys)
        except BaseException as exc:  # every waiter sees the failure (and the server keeps serving)
            for future in pops.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for key, future in pops.items():
            if not future.done():
                future.set_result(replies[key])

    def _tokens(self, sae: str, raw: Readout) -> dict[str, Any]:
        catalog = self.registry.saes[sae].catalog
        tokens = []
        for position, indices, values in zip(raw.positions, raw.indices, raw.values, strict=True):
            feats = [{"feature": i, "label": catalog.label_of(i), "activation": round(v, 4)}
                     for i, v in zip(indices, values, strict=True)]
            tokens.append({"position": position, "features": feats})
        return {"sae": sae, "tokens": tokens}

    def response_object(self, prepared: PreparedRequest, collected: Collected) -> dict[str, Any] | None:
        """The response's ``sae`` object (None: the client asked for nothing and sees nothing)."""
        if not prepared.asked and not collected.guardrails:
            return None
        body = {"applied": [asdict(a) for a in prepared.applied], "features": collected.features}
        if prepared.guarded or collected.guardrails:
            body["guardrails"] = collected.guardrails
        if collected.hidden_states is not None:
            body["hidden_states"] = hidden_states_json(collected.hidden_states)
        return body

    # --- descriptions ----------------------------------------------------------------------------
    def saes(self) -> list[dict[str, Any]]:
        out = []
        for name, loaded in self.registry.saes.items():
            sae = loaded.sae
            out.append({"name": name, "architecture": sae.cfg.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
                        "hook_layer": sae.hook_layer, "hook_point": sae.hook_point, "model_name": sae.cfg.model_name,
                        "watchlist": [{"feature": f, "label": loaded.catalog.label_of(f)} for f in loaded.watchlist],
                        "labelled_features": {i.label: f for f, i in loaded.catalog.features.items() if i.label}})
        return out

    def feature(self, sae: str, ref: int | str) -> dict[str, Any]:
        """A feature's card, by index or label (a URL path segment of ASCII digits is an index)."""
        if sae not in self.registry.saes:
            raise SpecError("sae", f"unknown SAE {sae!r} (loaded: {sorted(self.registry.saes)})")
        catalog = self.registry.saes[sae].catalog
        index = catalog.resolve(ref, "feature")
        return {"sae": sae, "feature": index, **catalog.info(index).model_dump()}

    @staticmethod
    def path_ref(segment: str) -> int | str:
        """A feature named in a URL: ASCII digits are an index, anything else a label."""
        return int(segment) if FEATURE_INDEX.fullmatch(segment) else segment


def hidden_states_json(states: list[HiddenStates]) -> list[dict[str, Any]]:
    """Hidden states as the HTTP API returns them: the values base64-encoded."""
    return [{"layer": h.layer, "positions": h.positions, "dtype": h.dtype, "shape": h.shape,
             "data": base64.b64encode(h.data).decode()} for h in states]


def _unsent(prepared: PreparedRequest, states: HiddenStates) -> HiddenStates:
    """``states`` less the positions already collected for its layer."""
    mark = prepared.delivered.get(states.layer, -1)
    keep = [i for i, p in enumerate(states.positions) if p > mark]
    if len(keep) == len(states.positions):
        kept = states
    else:
        row = len(states.data) // max(1, states.shape[0])
        kept = HiddenStates(states.layer, [states.positions[i] for i in keep], states.dtype,
                            [len(keep), states.shape[1]], b"".join(states.data[i * row:(i + 1) * row] for i in keep))
    if kept.positions:
        prepared.delivered[states.layer] = kept.positions[-1]
    return kept
