"""The service layer every API adapter calls: validate a request's steering, admit it (sign it for
the workers), collect its activations and errors, and describe the loaded SAEs and features.
Written once, so HTTP and gRPC enforce the same rules and build the same answers."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from sae_serve.config import SaeServeConfig
from sae_serve.engines.protocol import (
    CAPABILITIES,
    POP_READOUTS,
    EngineRequest,
    Readout,
    WorkerCapabilities,
    admit,
    deployment_secret,
    merge_replies,
    secret_id,
)
from sae_serve.errors import PolicyError, SaeServeError, SpecError, WorkerError, field_path
from sae_serve.metrics import ApiMetrics, api_metrics
from sae_serve.sae.registry import SaeRegistry, build_registry
from sae_serve.steering.spec import AppliedIntervention, RequestSpec, ResolvedRequest, resolve

FEATURE_INDEX = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class PreparedRequest:
    """What the engine needs for one request, and what the response reports."""

    engine: EngineRequest
    applied: tuple[AppliedIntervention, ...]
    readout_sae: str | None


class SteeringService:
    def __init__(self, config: SaeServeConfig, metrics: ApiMetrics | None = None,
                 capabilities: WorkerCapabilities | None = None) -> None:
        # The API process keeps SAEs on the CPU for validation and feature cards only.
        self.registry: SaeRegistry = build_registry(config)
        self.policy = config.policy
        self.limits = config.limits
        self.metrics = metrics or api_metrics()
        self.capabilities = capabilities
        """What the workers can run; learned from them at startup (``learn_capabilities``)."""

    async def learn_capabilities(self, engine_client: Any) -> WorkerCapabilities:
        caps = WorkerCapabilities.from_workers(await engine_client.collective_rpc(CAPABILITIES))
        if caps is None:
            raise SaeServeError("vLLM's workers loaded no SAEs: enable the general plugin in every process "
                                "(VLLM_PLUGINS=sae_serve) and give them the same SAE_SERVE_CONFIG")
        if caps.secret_id != secret_id(deployment_secret()):
            raise SaeServeError("vLLM's workers have another SAE_SERVE_SECRET than this API process")
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

    def prepare(self, spec: RequestSpec, client_salt: str | None = None,
                fan_out: dict[str, int] | None = None) -> PreparedRequest | None:
        """None for a request that neither steers nor reads; raises SpecError (PolicyError when the
        policy refuses it) naming the field. Counts steered and refused requests. ``fan_out``: the
        request's fields that make vLLM run several sequences under it, and how many (``n``,
        ``prompt`` lists, ``use_beam_search``)."""
        try:
            resolved = resolve(spec, self.registry)
            self.policy.check(spec, resolved, self.registry)
        except PolicyError as exc:
            self.metrics.refused.labels("policy_forbidden" if exc.forbidden else "policy_limit").inc()
            raise
        except SpecError:
            self.metrics.refused.labels("invalid").inc()
            raise
        if resolved.is_empty:
            return None
        try:
            self._check_capacity(resolved, fan_out or {})
        except SpecError:
            self.metrics.refused.labels("capacity").inc()
            raise
        for mode in sorted({a.mode for a in resolved.applied} | ({"vector"} if resolved.vectors else set())):
            self.metrics.steered.labels(mode).inc()
        return PreparedRequest(admit(spec, client_salt), resolved.applied,
                               spec.return_features.sae if spec.return_features else None)

    def _check_capacity(self, resolved: ResolvedRequest, fan_out: dict[str, int]) -> None:
        """What the workers could not run whole, or could hold only past the limits."""
        if fan_out.get("use_beam_search"):  # vLLM's beam search builds its own sampling params: unsteered
            raise SpecError("use_beam_search", "steering and return_features do not apply to beam search")
        for field, sequences in fan_out.items():
            if resolved.readout is not None and sequences > 1:
                raise SpecError(field, f"return_features reads one sequence, and this asks for {sequences}: send "
                                "them as separate requests, or drop return_features")
        if self.capabilities is not None:
            self.capabilities.check(resolved, self.limits)

    async def collect(self, engine_client: Any, prepared: PreparedRequest) -> dict[str, Any] | None:
        """The request's readout so far (removed from the workers) as a JSON-ready object, None
        when it does not read. Raises WorkerError (counted) when a worker failed it."""
        key = prepared.engine.key
        reply = merge_replies(await engine_client.collective_rpc(POP_READOUTS, args=([key],)), [key])[key]
        if reply.error is not None:
            self.metrics.refused.labels("worker_error").inc()
            raise WorkerError(f"the engine could not serve this request as admitted: {reply.error}")
        if prepared.readout_sae is None:
            return None
        got = reply.features.get(prepared.readout_sae)
        return self._tokens(prepared.readout_sae, got) if got else {"sae": prepared.readout_sae, "tokens": []}

    async def discard(self, engine_client: Any, prepared: PreparedRequest) -> None:
        """Drop what the workers hold for a request that ended without its answer (aborted)."""
        await engine_client.collective_rpc(POP_READOUTS, args=([prepared.engine.key],))

    def _tokens(self, sae: str, raw: Readout) -> dict[str, Any]:
        catalog = self.registry.saes[sae].catalog
        tokens = []
        for position, indices, values in zip(raw.positions, raw.indices, raw.values, strict=True):
            feats = [{"feature": i, "label": catalog.label_of(i), "activation": round(v, 4)}
                     for i, v in zip(indices, values, strict=True)]
            tokens.append({"position": position, "features": feats})
        return {"sae": sae, "tokens": tokens}

    def response_object(self, prepared: PreparedRequest, features: dict[str, Any] | None) -> dict[str, Any]:
        return {"applied": [asdict(a) for a in prepared.applied], "features": features}

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
