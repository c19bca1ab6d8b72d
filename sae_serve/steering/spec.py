"""What a request may ask: the steering and readout schema, and its resolution against the
loaded SAEs into a frozen, engine-ready ``ResolvedRequest``.

Math (DESIGN.md): for each intervened feature i with target t_i,
x' = x + sum_i (t_i - a_i(x)) W_dec[i]; the SAE's reconstruction error passes through unchanged
(Scaling Monosemanticity, "Feature steering"). Every mode is an affine target t = mult * a + offset:
clamp v -> (0, v), add v -> (1, v), scale v -> (v, 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from sae_serve.errors import SpecError
from sae_serve.sae.registry import NAME_PATTERN, SaeRegistry

# Hard sanity bounds, whatever the policy says: beyond them no model output is meaningful.
MAX_ABS_VALUE = 1e4
MAX_ABS_MULTIPLE = 1e3
MAX_INTERVENTIONS = 256
MAX_TOP_K = 64
MAX_READOUT_FEATURES = 256
MAX_GUARDRAILS = 16
MAX_WINDOW = 64
MAX_HIDDEN_LAYERS = 16
MAX_HIDDEN_POSITIONS = 1024

FeatureRef = StrictInt | Annotated[str, Field(min_length=1, max_length=128)]
Bounded = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
Multiple = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_MULTIPLE, le=MAX_ABS_MULTIPLE)]
Positions = Literal["all", "prompt", "generated"]
Mode = Literal["clamp", "add", "scale"]
Action = Literal["steer", "abort", "flag"]
StateDtype = Literal["float16", "float32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Intervention(_Strict):
    """Edit one feature of one SAE on every token in scope."""

    sae: str = Field(max_length=64, description="Name of a loaded SAE (see GET /v1/saes).")
    feature: FeatureRef = Field(description="Feature index, or its catalog label.")
    mode: Mode = Field(description="clamp: set to a value; add: add a value; scale: multiply (0 ablates).")
    value: Bounded | None = Field(default=None, description="The value for clamp, add or scale.")
    multiple_of_max: Multiple | None = Field(
        default=None, description="clamp only: target = this multiple of the feature's max activation."
    )

    @model_validator(mode="after")
    def _one_strength(self) -> Intervention:
        if self.mode == "clamp":
            if (self.value is None) == (self.multiple_of_max is None):
                raise ValueError("clamp takes exactly one of value or multiple_of_max")
        else:
            if self.multiple_of_max is not None:
                raise ValueError(f"multiple_of_max applies to clamp only, not {self.mode}")
            if self.value is None:
                raise ValueError(f"{self.mode} needs a value")
        return self


class VectorSteering(_Strict):
    """Add ``coefficient`` times a named steering vector from the server's registry."""

    name: str = Field(max_length=64, description="Name of a registered steering vector.")
    coefficient: Bounded = Field(description="Multiplier of the vector.")


class SteeringSpec(_Strict):
    """The ``steering`` object of a request."""

    interventions: list[Intervention] = Field(default=[], max_length=MAX_INTERVENTIONS)
    vectors: list[VectorSteering] = Field(default=[], max_length=16)
    positions: Positions = Field(
        default="all", description="Which tokens are edited: all, prompt only, or generated only."
    )


class FeatureReadoutSpec(_Strict):
    """The ``return_features`` object: per-token activations of one SAE."""

    sae: str = Field(max_length=64)
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K, description="The k most active features per token.")
    features: list[FeatureRef] | None = Field(
        default=None, min_length=1, max_length=MAX_READOUT_FEATURES,
        description="These features' activations on every token.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> FeatureReadoutSpec:
        if (self.top_k is None) == (self.features is None):
            raise ValueError("return_features takes exactly one of top_k or features")
        return self


class HiddenStatesSpec(_Strict):
    """The ``return_hidden_states`` object: the residual stream after decoder layer L (SAELens
    ``blocks.L.hook_resid_post``, transformers' ``hidden_states[L + 1]``), before any steering at L."""

    layers: list[Annotated[StrictInt, Field(ge=0, le=1023)]] = Field(
        min_length=1, max_length=MAX_HIDDEN_LAYERS, description="Decoder layers, 0-based.")
    positions: Literal["last", "all"] | Annotated[list[Annotated[StrictInt, Field(ge=0, lt=2**31)]], Field(
            min_length=1, max_length=MAX_HIDDEN_POSITIONS)] = Field(
        default="last", description="last: the prompt's last token; all: every token the model computes "
        "(the prompt, then each generated token but the final one); or these sequence positions.")
    dtype: StateDtype = Field(default="float32", description="The returned values' type (little-endian).")

    @field_validator("layers")
    @classmethod
    def _layers_once(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError("each layer once")
        return layers

    @field_validator("positions")
    @classmethod
    def _positions_once(cls, positions: str | list[int]) -> str | list[int]:
        if isinstance(positions, list) and len(set(positions)) != len(positions):
            raise ValueError("each position once")
        return positions


class Threshold(_Strict):
    """Where a trigger starts to count a token: above an absolute value, or a multiple of the
    feature's calibrated max activation."""

    value: Bounded | None = None
    multiple_of_max: Multiple | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Threshold:
        if (self.value is None) == (self.multiple_of_max is None):
            raise ValueError("above takes exactly one of value or multiple_of_max")
        return self


class Trigger(_Strict):
    """A feature of a loaded SAE, or a linear probe, above a threshold on ``tokens`` of the last
    ``window`` tokens in ``positions``."""

    sae: str | None = Field(default=None, max_length=64, description="The SAE of the trigger feature.")
    feature: FeatureRef | None = Field(default=None, description="Feature index, or its catalog label.")
    probe: str | None = Field(default=None, max_length=64, description="A loaded linear probe (instead of a feature).")
    above: Threshold
    tokens: int = Field(default=1, ge=1, le=MAX_WINDOW, description="How many tokens of the window must be above.")
    window: int = Field(default=1, ge=1, le=MAX_WINDOW, description="The last this many tokens in positions.")
    positions: Positions = Field(default="generated", description="Which tokens are watched.")

    @model_validator(mode="after")
    def _one_source(self) -> Trigger:
        if (self.probe is None) == (self.sae is None and self.feature is None):
            raise ValueError("a trigger names either sae and feature, or probe")
        if self.probe is None and (self.sae is None or self.feature is None):
            raise ValueError("a feature trigger names both sae and feature")
        if self.probe is not None and self.above.multiple_of_max is not None:
            raise ValueError("a probe has no max activation: use above.value")
        if self.tokens > self.window:
            raise ValueError(f"tokens ({self.tokens}) cannot exceed window ({self.window})")
        return self


class Guardrail(_Strict):
    """A rule: when ``when`` fires, ``steer`` (apply ``steering`` from that token on), ``abort``
    (end the request there, finish_reason content_filter) or ``flag`` (report it, change nothing)."""

    name: str = Field(pattern=NAME_PATTERN, description="Reported when the rule fires.")
    when: Trigger
    action: Action
    steering: SteeringSpec | None = Field(default=None, description="steer only: what to apply once it fires.")

    @model_validator(mode="after")
    def _steering_for_steer(self) -> Guardrail:
        if (self.action == "steer") != (self.steering is not None):
            raise ValueError("steering goes with action steer, and only with it")
        if self.steering is not None and self.steering.positions != "all":
            raise ValueError("a guardrail steers every token from its trigger on: leave steering.positions out")
        return self


class RequestSpec(_Strict):
    """Everything sae_serve reads from a request body, and the server's own guardrails (which the
    service adds; a client cannot set them: no route passes that field through)."""

    steering: SteeringSpec | None = None
    return_features: FeatureReadoutSpec | None = None
    return_hidden_states: HiddenStatesSpec | None = None
    guardrails: list[Guardrail] = Field(default=[], max_length=MAX_GUARDRAILS)
    server_guardrails: list[Guardrail] = Field(default=[], max_length=MAX_GUARDRAILS)


# --- resolved, engine-ready form ---------------------------------------------------------------
@dataclass(frozen=True)
class SaeEdit:
    """One request's feature edits on one SAE: t = mult * a + offset for each feature."""

    features: tuple[int, ...]
    mult: tuple[float, ...]
    offset: tuple[float, ...]


@dataclass(frozen=True)
class AppliedIntervention:
    """What was applied, for the response: the feature index and the concrete clamp value."""

    sae: str
    feature: int
    label: str | None
    mode: Mode
    value: float


@dataclass(frozen=True)
class ResolvedReadout:
    sae: str
    top_k: int | None
    features: tuple[int, ...] | None


@dataclass(frozen=True)
class ResolvedHiddenStates:
    layers: tuple[int, ...]
    positions: Literal["last", "all"] | tuple[int, ...]
    dtype: StateDtype

    def count(self, max_model_len: int) -> int:
        """The most positions one layer may return."""
        if self.positions == "last":
            return 1
        return max_model_len if self.positions == "all" else min(len(self.positions), max_model_len)

    def pick(self, first: int, count: int, prompt_len: int) -> range | list[int]:
        """Of ``count`` consecutive positions from ``first``, those read (as sequence positions)."""
        if self.positions == "all":
            return range(first, first + count)
        wanted = (prompt_len - 1,) if self.positions == "last" else self.positions
        return [p for p in wanted if first <= p < first + count]


@dataclass(frozen=True)
class ResolvedGuardrail:
    """A rule in indices: its trigger is read at SAE ``site``'s layer (a feature of that SAE, or a
    probe of that layer); a steer rule's ``edits`` and ``vectors`` apply once it fired."""

    name: str
    action: Action
    site: str
    feature: int | None  # None: the probe
    probe: str | None
    threshold: float
    tokens: int
    window: int
    positions: Positions
    edits: dict[str, SaeEdit]
    vectors: dict[str, torch.Tensor]
    applied: tuple[AppliedIntervention, ...]  # steer: its interventions, in the rule's order
    server: bool  # the server's own rule (its name is not shown to clients unless the policy says so)

    def sae_names(self) -> set[str]:
        return {self.site} | set(self.edits) | set(self.vectors)


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request, in indices and tensors. Empty when it neither steers, reads nor guards."""

    edits: dict[str, SaeEdit]
    vectors: dict[str, torch.Tensor]  # SAE name -> (d_in,) sum of coefficient * vector
    positions: Positions
    readout: ResolvedReadout | None
    applied: tuple[AppliedIntervention, ...]
    guardrails: tuple[ResolvedGuardrail, ...] = ()
    hidden: ResolvedHiddenStates | None = None

    @property
    def is_empty(self) -> bool:
        return (not self.edits and not self.vectors and self.readout is None and not self.guardrails
                and self.hidden is None)

    def sae_names(self) -> set[str]:
        names = set(self.edits) | set(self.vectors)
        names |= {name for rule in self.guardrails for name in rule.sae_names()}
        return names | ({self.readout.sae} if self.readout else set())


EMPTY_REQUEST = ResolvedRequest({}, {}, "all", None, ())


def _affine(mode: Mode, value: float) -> tuple[float, float]:
    return {"clamp": (0.0, value), "add": (1.0, value), "scale": (value, 0.0)}[mode]


def _require_sae(registry: SaeRegistry, name: str, field: str) -> None:
    if name not in registry.saes:
        raise SpecError(field, f"unknown SAE {name!r} (loaded: {sorted(registry.saes)})")


def _resolve_intervention(
    item: Intervention, registry: SaeRegistry, field: str
) -> AppliedIntervention:
    _require_sae(registry, item.sae, f"{field}.sae")
    catalog = registry.saes[item.sae].catalog
    index = catalog.resolve(item.feature, f"{field}.feature")
    if item.multiple_of_max is None:
        value = float(item.value or 0.0)  # the schema guarantees a value when there is no multiple
    else:
        max_act = catalog.info(index).max_activation
        if max_act is None:
            raise SpecError(
                f"{field}.multiple_of_max",
                f"feature {index} of SAE {item.sae!r} has no calibrated max activation; use value",
            )
        value = item.multiple_of_max * max_act
    return AppliedIntervention(item.sae, index, catalog.label_of(index), item.mode, value)


def _edits(applied: tuple[AppliedIntervention, ...], field: str) -> dict[str, SaeEdit]:
    by_sae: dict[str, list[AppliedIntervention]] = {}
    for i, item in enumerate(applied):
        group = by_sae.setdefault(item.sae, [])
        if any(prev.feature == item.feature for prev in group):
            raise SpecError(f"{field}[{i}].feature", f"feature {item.feature} of SAE {item.sae!r} is edited twice")
        group.append(item)
    edits = {}
    for sae, items in by_sae.items():
        pairs = [_affine(it.mode, it.value) for it in items]
        edits[sae] = SaeEdit(
            tuple(it.feature for it in items), tuple(m for m, _ in pairs), tuple(c for _, c in pairs)
        )
    return edits


def _vectors(spec: SteeringSpec, registry: SaeRegistry, field: str = "steering") -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    for i, item in enumerate(spec.vectors):
        if any(prev.name == item.name for prev in spec.vectors[:i]):  # (sums would get past strength limits)
            raise SpecError(f"{field}.vectors[{i}].name", f"steering vector {item.name!r} is named twice")
        vec = registry.vectors.get(item.name)
        if vec is None:
            raise SpecError(
                f"{field}.vectors[{i}].name",
                f"unknown steering vector {item.name!r} (registered: {sorted(registry.vectors)})",
            )
        sums[vec.sae] = sums.get(vec.sae, 0) + item.coefficient * vec.vector
    return sums


def _readout(spec: FeatureReadoutSpec, registry: SaeRegistry) -> ResolvedReadout:
    _require_sae(registry, spec.sae, "return_features.sae")
    if spec.features is None:
        return ResolvedReadout(spec.sae, spec.top_k, None)
    catalog = registry.saes[spec.sae].catalog
    indices = tuple(
        catalog.resolve(ref, f"return_features.features[{i}]") for i, ref in enumerate(spec.features)
    )
    return ResolvedReadout(spec.sae, None, indices)


def _threshold(rule: Guardrail, registry: SaeRegistry, sae: str, feature: int | None, field: str) -> float:
    above = rule.when.above
    if above.multiple_of_max is None:
        return float(above.value or 0.0)  # the schema guarantees a value when there is no multiple
    max_act = registry.saes[sae].catalog.info(feature).max_activation
    if max_act is None:
        raise SpecError(f"{field}.when.above.multiple_of_max",
                        f"feature {feature} of SAE {sae!r} has no calibrated max activation; use value")
    return above.multiple_of_max * max_act


def _trigger_site(rule: Guardrail, registry: SaeRegistry, field: str) -> tuple[str, int | None]:
    """(the SAE at whose layer the trigger is read, the trigger feature or None for a probe)."""
    when = rule.when
    if when.probe is not None:
        probe = registry.probes.get(when.probe)
        if probe is None:
            raise SpecError(f"{field}.when.probe", f"unknown probe {when.probe!r} (loaded: {sorted(registry.probes)})")
        return probe.sae, None
    _require_sae(registry, str(when.sae), f"{field}.when.sae")
    return str(when.sae), registry.saes[str(when.sae)].catalog.resolve(when.feature, f"{field}.when.feature")


def _resolve_guardrail(rule: Guardrail, registry: SaeRegistry, field: str, server: bool) -> ResolvedGuardrail:
    site, feature = _trigger_site(rule, registry, field)
    steering = rule.steering or SteeringSpec()
    applied = tuple(_resolve_intervention(item, registry, f"{field}.steering.interventions[{i}]")
                    for i, item in enumerate(steering.interventions))
    edits = _edits(applied, f"{field}.steering.interventions")
    vectors = _vectors(steering, registry, f"{field}.steering")
    layer = registry.saes[site].sae.site_layer
    for name in set(edits) | set(vectors):
        if name != site and registry.saes[name].sae.site_layer <= layer:
            raise SpecError(f"{field}.steering", f"SAE {name!r} reads layer {registry.saes[name].sae.site_layer}, "
                            f"not after the trigger's layer {layer}: a guardrail steers at its trigger's SAE or a "
                            "later layer")
    return ResolvedGuardrail(rule.name, rule.action, site, feature, rule.when.probe,
                             _threshold(rule, registry, site, feature, field), rule.when.tokens, rule.when.window,
                             rule.when.positions, edits, vectors, applied, server)


def _guardrails(spec: RequestSpec, registry: SaeRegistry,
                own: tuple[AppliedIntervention, ...]) -> tuple[ResolvedGuardrail, ...]:
    rules = [(rule, f"guardrails[{i}]", False) for i, rule in enumerate(spec.guardrails)]
    rules += [(rule, f"server_guardrails[{i}]", True) for i, rule in enumerate(spec.server_guardrails)]
    for i, rule in enumerate(spec.guardrails):
        if any(prev.name == rule.name for prev in spec.guardrails[:i]):
            raise SpecError(f"guardrails[{i}].name", f"guardrail {rule.name!r} is named twice")
    resolved = tuple(_resolve_guardrail(rule, registry, field, server) for rule, field, server in rules)
    _no_stacking(spec, own, resolved)
    return resolved


def _no_stacking(spec: RequestSpec, own: tuple[AppliedIntervention, ...], rules: tuple[ResolvedGuardrail, ...]) -> None:
    """A request's edits add up: the same feature or vector twice, in its steering and its rules,
    would get past the policy's strength limits (or undo another rule), so each may appear once."""
    features = {(a.sae, a.feature) for a in own}
    vectors = {v.name for v in (spec.steering.vectors if spec.steering else ())}
    for i, (rule, resolved) in enumerate(zip(spec.guardrails, rules, strict=False)):
        for j, applied in enumerate(resolved.applied):
            if (applied.sae, applied.feature) in features:
                raise SpecError(f"guardrails[{i}].steering.interventions[{j}].feature", f"feature {applied.feature} "
                                f"of SAE {applied.sae!r} is already edited by this request")
            features.add((applied.sae, applied.feature))
        for j, vector in enumerate(rule.steering.vectors if rule.steering else ()):
            if vector.name in vectors:
                raise SpecError(f"guardrails[{i}].steering.vectors[{j}].name", f"steering vector {vector.name!r} is "
                                "already added by this request")
            vectors.add(vector.name)


def resolve(spec: RequestSpec, registry: SaeRegistry) -> ResolvedRequest:
    """Check ``spec`` against the loaded SAEs; errors name the request field at fault."""
    steering = spec.steering or SteeringSpec()
    field = "steering.interventions"
    applied = tuple(
        _resolve_intervention(item, registry, f"{field}[{i}]")
        for i, item in enumerate(steering.interventions)
    )
    return ResolvedRequest(
        edits=_edits(applied, field),
        vectors=_vectors(steering, registry),
        positions=steering.positions,
        readout=_readout(spec.return_features, registry) if spec.return_features else None,
        applied=applied,
        guardrails=_guardrails(spec, registry, applied),
        hidden=_hidden(spec.return_hidden_states),
    )


def _hidden(spec: HiddenStatesSpec | None) -> ResolvedHiddenStates | None:
    """Which layers exist is the workers' to say (``WorkerCapabilities``): the registry knows SAEs only."""
    if spec is None:
        return None
    positions = spec.positions if isinstance(spec.positions, str) else tuple(sorted(spec.positions))
    return ResolvedHiddenStates(tuple(spec.layers), positions, spec.dtype)
