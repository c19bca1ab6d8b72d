"""Who may steer what, how hard, and who may read activations: the ``policy`` config section.

Engine-agnostic like the rest of steering/ (engines read the config that holds it); the server's
service layer checks it, so HTTP and gRPC enforce it identically. A request outside the
policy is refused whole with a ``PolicyError`` naming the field: ``forbidden`` (HTTP 403, gRPC
PERMISSION_DENIED) when it asks for something not permitted, otherwise a limit (HTTP 400, gRPC
INVALID_ARGUMENT) when a strength is larger than the policy allows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sae_serve.errors import PolicyError
from sae_serve.sae.features import FeatureCatalog
from sae_serve.sae.registry import SaeRegistry
from sae_serve.steering.spec import (
    AppliedIntervention,
    Guardrail,
    Intervention,
    RequestSpec,
    ResolvedGuardrail,
    ResolvedRequest,
)


class FeatureSelector(BaseModel):
    """A set of features of one SAE, by index, label or tag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: tuple[int | str, ...] = ()
    """Indices or catalog labels."""
    tags: tuple[str, ...] = ()
    """Catalog tags, e.g. ``language``."""

    def contains(self, index: int, catalog: FeatureCatalog) -> bool:
        info = catalog.info(index)
        return (index in self.features or (info.label is not None and info.label in self.features)
                or any(tag in info.tags for tag in self.tags))


class Policy(BaseModel):
    """The ``policy`` section of the config file. The defaults allow everything within sane bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steerable: dict[str, FeatureSelector] | None = None
    """Per SAE, the features that may be steered; SAEs not listed may not be steered. None: all."""
    readable: dict[str, FeatureSelector] | None = None
    """Per SAE, the features whose activations may be returned (top_k is then refused). None: all."""
    allow_readout: bool = True
    """Whether requests may ask for activations at all."""
    allow_vectors: bool = True
    """Whether requests may add named steering vectors."""
    max_abs_multiple_of_max: float = Field(default=20.0, gt=0)
    """Largest |multiple_of_max| of a clamp (the paper used -2x ... 20x)."""
    max_abs_value: float = Field(default=1000.0, gt=0)
    """Largest |value| of a clamp, add or scale."""
    max_abs_vector_coefficient: float = Field(default=1000.0, gt=0)
    """Largest |coefficient| of a steering vector."""
    guardrail_actions: tuple[Literal["steer", "abort", "flag"], ...] = ("steer", "abort", "flag")
    """What a request's own guardrails may do (empty: requests may not bring guardrails). Their
    triggers are reads (``readable``, ``probes``), their steering is steering (the rules above)."""
    probes: tuple[str, ...] | None = None
    """The probes a request's guardrails may name. None: all."""
    reveal_server_guardrails: bool = False
    """Whether responses name the server's own guardrails that fired on them."""
    hidden_state_layers: tuple[int, ...] | None = None
    """The layers whose hidden states requests may read (``return_hidden_states``). None: every
    layer the workers expose (config ``hidden_states``), unless the policy restricts reads
    (``allow_readout``, ``readable``, ``probes``): then none; empty: none."""

    def check(self, spec: RequestSpec, resolved: ResolvedRequest, registry: SaeRegistry) -> None:
        """Raise ``PolicyError`` for the first thing ``spec`` may not do (the server's own
        guardrails are the operator's, not the client's: unchecked)."""
        steering = spec.steering
        if steering is not None:
            self._check_interventions("steering", steering.interventions, resolved.applied, registry)
            self._check_vectors(steering.vectors)
        if spec.return_features is not None:
            self._check_readout(spec, resolved, registry)
        for i, rule in enumerate(spec.guardrails):
            self._check_guardrail(f"guardrails[{i}]", rule, resolved.guardrails[i], registry)
        if spec.return_hidden_states is not None:
            self._check_hidden_states(spec.return_hidden_states.layers)

    def _check_hidden_states(self, layers: list[int]) -> None:
        allowed = self.hidden_state_layers
        if allowed is None and (not self.allow_readout or self.readable is not None or self.probes is not None):
            # The stream holds every feature and probe: a policy that hides some hides it too.
            raise PolicyError("return_hidden_states", "hidden states are not returned on this server: its policy "
                              "restricts what may be read (list layers in policy.hidden_state_layers to allow them)",
                              forbidden=True)
        for i, layer in enumerate(layers):
            if allowed is not None and layer not in allowed:
                raise PolicyError(f"return_hidden_states.layers[{i}]", f"layer {layer}'s hidden states may not be "
                                  f"read on this server (readable: {sorted(allowed)})", forbidden=True)

    def _check_guardrail(self, field: str, rule: Guardrail, resolved: ResolvedGuardrail, registry: SaeRegistry) -> None:
        if rule.action not in self.guardrail_actions:
            raise PolicyError(f"{field}.action", f"guardrails may not {rule.action} on this server "
                              f"(allowed: {list(self.guardrail_actions)})", forbidden=True)
        if resolved.probe is not None:
            if not self.allow_readout or (self.probes is not None and resolved.probe not in self.probes):
                raise PolicyError(f"{field}.when.probe", f"probe {resolved.probe!r} may not be read on this server",
                                  forbidden=True)
        elif not self.allow_readout or not self._readable(resolved.site, int(resolved.feature or 0), registry):
            raise PolicyError(f"{field}.when.feature", f"feature {resolved.feature} of SAE {resolved.site!r} may not "
                              "be read on this server", forbidden=True)
        if rule.steering is not None:
            self._check_interventions(f"{field}.steering", rule.steering.interventions, resolved.applied, registry)
            self._check_vectors(rule.steering.vectors, f"{field}.steering")

    def _readable(self, sae: str, feature: int, registry: SaeRegistry) -> bool:
        if self.readable is None:
            return True
        return self.readable.get(sae, FeatureSelector()).contains(feature, registry.saes[sae].catalog)

    def _check_interventions(self, prefix: str, items: list[Intervention],
                             resolved: tuple[AppliedIntervention, ...], registry: SaeRegistry) -> None:
        for i, (item, applied) in enumerate(zip(items, resolved, strict=True)):
            field = f"{prefix}.interventions[{i}]"
            selector = None if self.steerable is None else self.steerable.get(applied.sae, FeatureSelector())
            if selector is not None and not selector.contains(applied.feature, registry.saes[applied.sae].catalog):
                raise PolicyError(f"{field}.feature", f"feature {applied.feature} of SAE {applied.sae!r} may not "
                                  "be steered on this server", forbidden=True)
            if item.multiple_of_max is not None and abs(item.multiple_of_max) > self.max_abs_multiple_of_max:
                raise PolicyError(f"{field}.multiple_of_max", f"|{item.multiple_of_max}| exceeds this server's "
                                  f"limit of {self.max_abs_multiple_of_max}")
            if item.value is not None and abs(item.value) > self.max_abs_value:
                raise PolicyError(f"{field}.value", f"|{item.value}| exceeds this server's limit of "
                                  f"{self.max_abs_value}")

    def _check_vectors(self, vectors: list, prefix: str = "steering") -> None:
        if vectors and not self.allow_vectors:
            raise PolicyError(f"{prefix}.vectors", "steering vectors are not allowed on this server", forbidden=True)
        for i, vec in enumerate(vectors):
            if abs(vec.coefficient) > self.max_abs_vector_coefficient:
                raise PolicyError(f"{prefix}.vectors[{i}].coefficient", f"|{vec.coefficient}| exceeds this "
                                  f"server's limit of {self.max_abs_vector_coefficient}")

    def _check_readout(self, spec: RequestSpec, resolved: ResolvedRequest, registry: SaeRegistry) -> None:
        if not self.allow_readout:
            raise PolicyError("return_features", "feature activations are not returned on this server",
                              forbidden=True)
        readout = resolved.readout
        if self.readable is None or readout is None:
            return
        selector = self.readable.get(readout.sae, FeatureSelector())
        if readout.features is None:
            raise PolicyError("return_features.top_k", "top_k is not allowed here: list the features to read",
                              forbidden=True)
        catalog = registry.saes[readout.sae].catalog
        for j, feature in enumerate(readout.features):
            if not selector.contains(feature, catalog):
                raise PolicyError(f"return_features.features[{j}]", f"feature {feature} of SAE {readout.sae!r} "
                                  "may not be read on this server", forbidden=True)
