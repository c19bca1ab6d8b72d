"""The service layer every API adapter calls: validate a request's steering, turn it into what
the engine reads, collect its activations, and describe the loaded SAEs and features.
Written once, so HTTP and gRPC enforce the same rules and build the same answers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from sae_serve.config import SaeServeConfig
from sae_serve.engines.vllm_offline import EngineRequest, engine_request
from sae_serve.engines.vllm_plugin import WORKER_METHOD
from sae_serve.errors import PolicyError, SpecError, field_path
from sae_serve.metrics import ApiMetrics, api_metrics
from sae_serve.sae.registry import SaeRegistry, build_registry
from sae_serve.steering.spec import AppliedIntervention, RequestSpec, resolve


@dataclass(frozen=True)
class PreparedRequest:
    """What the engine needs for one request, and what the response reports."""

    engine: EngineRequest
    applied: tuple[AppliedIntervention, ...]
    readout_sae: str | None


class SteeringService:
    def __init__(self, config: SaeServeConfig, metrics: ApiMetrics | None = None) -> None:
        # The API process keeps SAEs on the CPU for validation and feature cards only.
        self.registry: SaeRegistry = build_registry(config)
        self.policy = config.policy
        self.op = config.op
        self.metrics = metrics or api_metrics()

    def parse(self, body: dict[str, Any]) -> RequestSpec:
        """A request's ``steering`` and ``return_features`` as a RequestSpec; SpecError naming the
        field (counted as refused), for every protocol alike."""
        try:
            return RequestSpec.model_validate(body)
        except ValidationError as exc:
            self.metrics.refused.labels("invalid").inc()
            err = exc.errors()[0]
            raise SpecError(field_path(err["loc"]), err["msg"]) from None

    def prepare(self, spec: RequestSpec) -> PreparedRequest | None:
        """None for a request that neither steers nor reads; raises SpecError (PolicyError when the
        policy refuses it) naming the field. Counts steered and refused requests."""
        try:
            resolved = resolve(spec, self.registry)
            self.policy.check(spec, resolved, self.registry)
            self.op.check(resolved)
        except PolicyError as exc:
            self.metrics.refused.labels("policy_forbidden" if exc.forbidden else "policy_limit").inc()
            raise
        except SpecError:
            self.metrics.refused.labels("invalid").inc()
            raise
        if resolved.is_empty:
            return None
        for mode in sorted({a.mode for a in resolved.applied} | ({"vector"} if resolved.vectors else set())):
            self.metrics.steered.labels(mode).inc()
        return PreparedRequest(engine_request(spec), resolved.applied,
                               spec.return_features.sae if spec.return_features else None)

    async def activations(self, engine_client: Any, prepared: PreparedRequest) -> dict[str, Any] | None:
        """The request's readout from the workers (removed there), as a JSON-ready object."""
        if prepared.readout_sae is None:
            return None
        key = prepared.engine.key
        for worker in await engine_client.collective_rpc(WORKER_METHOD, args=([key],)):
            got = worker.get(key, {})
            if got.get("features", {}).get(prepared.readout_sae):
                return self._tokens(prepared.readout_sae, got["features"][prepared.readout_sae])
        return {"sae": prepared.readout_sae, "tokens": []}

    def _tokens(self, sae: str, raw: dict[str, list]) -> dict[str, Any]:
        catalog = self.registry.saes[sae].catalog
        tokens = []
        for position, indices, values in zip(raw["positions"], raw["indices"], raw["values"], strict=True):
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

    def feature(self, sae: str, ref: str) -> dict[str, Any]:
        if sae not in self.registry.saes:
            raise SpecError("sae", f"unknown SAE {sae!r} (loaded: {sorted(self.registry.saes)})")
        catalog = self.registry.saes[sae].catalog
        index = catalog.resolve(int(ref) if ref.lstrip("-").isdigit() else ref, "feature")
        return {"sae": sae, "feature": index, **catalog.info(index).model_dump()}
