"""What crosses the boundary between the API process and vLLM's workers, one typed record each.

Trust: clients are untrusted, and vLLM copies a client's ``vllm_xargs`` into ``extra_args`` on
every route that has the field (completions, chat, responses, messages, and whatever comes
next). So a worker acts only on a spec the service *admitted*: its ``extra_args`` carry an HMAC
of (key, spec) under the deployment's secret (SAE_SERVE_SECRET, shared with every worker through
the environment). Anything else under a ``sae_serve`` key is ignored by the workers and counted.
That check in the worker is the one choke point, whatever route a request came by.

The cache salt of a steered request is a keyed hash of (the client's own cache_salt, the spec):
prompts steered alike share KV blocks, nothing else does, no client can compute another's salt,
and a client's cache_salt keeps separating tenants.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sae_serve import envs
from sae_serve.config import LimitsConfig
from sae_serve.errors import SaeServeError, SpecError
from sae_serve.steering.fixed import check_runnable
from sae_serve.steering.spec import RequestSpec, ResolvedRequest

PREFIX = "sae_serve"
"""Every extra_args key of ours starts with this; workers check all of them."""
SPEC_KEY = "sae_serve"
"""extra_args field holding the admitted spec (JSON)."""
REQUEST_KEY = "sae_serve_key"
"""extra_args field holding the request's key, under which its readout is kept."""
SIGNATURE_KEY = "sae_serve_sig"
"""extra_args field holding HMAC-SHA256(secret, key NUL spec)."""
POP_READOUTS = "sae_serve_pop_readouts"
"""Worker method: ``collective_rpc(POP_READOUTS, args=(keys,))`` -> {key: WorkerReply wire}."""
CAPABILITIES = "sae_serve_capabilities"
"""Worker method: ``collective_rpc(CAPABILITIES)`` -> WorkerCapabilities wire (None: no SAEs)."""


class UnauthenticatedSpec(SaeServeError):
    """extra_args name sae_serve fields that the service did not sign."""


def deployment_secret() -> bytes | None:
    secret = envs.deployment_secret()
    return secret.encode() if secret else None


def ensure_secret() -> bytes:
    """The deployment secret, made (and exported to the environment, which vLLM's workers inherit)
    when none is set: for a server or an offline engine started by this process."""
    secret = deployment_secret()
    if secret is None:
        os.environ[envs.SECRET_VAR] = token = secrets.token_hex(32)
        secret = token.encode()
    return secret


def secret_id(secret: bytes | None) -> str | None:
    """Names the secret without revealing it, so processes can check they share one."""
    return None if secret is None else hmac.new(secret, b"sae_serve secret id", hashlib.sha256).hexdigest()[:16]


def _sign(secret: bytes, key: str, spec_json: str) -> str:
    return hmac.new(secret, f"{key}\0{spec_json}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class EngineRequest:
    """An admitted request, as it rides into vLLM (built alike offline and by the servers)."""

    key: str
    spec_json: str
    signature: str
    cache_salt: str | None

    @property
    def extra_args(self) -> dict[str, str]:
        """Flat ``SamplingParams.extra_args`` (a client's vllm_xargs can never override them)."""
        return {SPEC_KEY: self.spec_json, REQUEST_KEY: self.key, SIGNATURE_KEY: self.signature}

    def prompt(self, prompt: str | list[int]) -> dict[str, Any]:
        """The prompt (text or token ids) as vLLM takes it, with the request's cache salt."""
        out: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
        return out if self.cache_salt is None else {**out, "cache_salt": self.cache_salt}


def cache_salt(secret: bytes, spec: RequestSpec, spec_json: str, client_salt: str | None) -> str | None:
    """The client's salt for plain requests; unique when the request reads (its prompt must be
    computed to be read: features or hidden states), has a guardrail that watches the prompt
    (likewise) or steers once fired (its KV is steered from a token no other request knows), or
    steers only prompt or only generated positions (a later turn's prompt holds earlier generated
    tokens, whose cached KV was steered by the other rule); else keyed by the secret, the client's
    salt and the spec."""
    steers = spec.steering is not None and bool(spec.steering.interventions or spec.steering.vectors)
    rules = [*spec.guardrails, *spec.server_guardrails]
    reads = spec.return_features is not None or spec.return_hidden_states is not None
    if reads or (steers and spec.steering.positions != "all") or any(
            rule.action == "steer" or rule.when.positions != "generated" for rule in rules):
        return uuid.uuid4().hex
    if steers:
        message = f"cache_salt\0{client_salt or ''}\0{spec_json}".encode()
        return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]
    return client_salt


def admit(spec: RequestSpec, client_salt: str | None = None, secret: bytes | None = None,
          key: str | None = None) -> EngineRequest:
    """Sign ``spec`` (already checked by the caller: the service, or a trusted offline user).
    ``key`` names its readout (default: a fresh random one); ``secret``: default, the deployment's."""
    secret = secret or deployment_secret()
    if secret is None:
        raise SaeServeError(f"{envs.SECRET_VAR} is not set: nothing can admit steering (sae-serve serve "
                            "and SteeredLLM set one; the Helm chart takes it from a Secret)")
    key, spec_json = key or uuid.uuid4().hex, spec.model_dump_json(exclude_none=True)
    salt = cache_salt(secret, spec, spec_json, client_salt)
    return EngineRequest(key, spec_json, _sign(secret, key, spec_json), salt)


def admitted_spec(extra_args: dict[str, Any] | None, secret: bytes | None) -> tuple[str, str] | None:
    """(key, spec JSON) of an admitted request; None for a plain one. Raises UnauthenticatedSpec
    when extra_args carry any sae_serve field without a valid signature."""
    ours = {k: v for k, v in (extra_args or {}).items() if isinstance(k, str) and k.startswith(PREFIX)}
    if not ours:
        return None
    key, spec_json, signature = ours.get(REQUEST_KEY), ours.get(SPEC_KEY), ours.get(SIGNATURE_KEY)
    if secret is None or not all(isinstance(v, str) for v in (key, spec_json, signature)) or set(ours) != {
            REQUEST_KEY, SPEC_KEY, SIGNATURE_KEY}:
        raise UnauthenticatedSpec(f"extra_args {sorted(ours)} were not signed by this deployment's service")
    if not hmac.compare_digest(_sign(secret, key, spec_json), signature):
        raise UnauthenticatedSpec("extra_args carry a sae_serve spec whose signature does not match")
    return key, spec_json


@dataclass(frozen=True)
class Readout:
    """One request's activations of one SAE, as plain lists (they cross process boundaries)."""

    positions: list[int]
    indices: list[list[int]]
    values: list[list[float]]


@dataclass(frozen=True)
class HiddenStates:
    """One request's residual stream after one layer at some positions: ``shape`` (positions,
    d_model) values of ``dtype``, little-endian, row-major, in ``data``."""

    layer: int
    positions: list[int]
    dtype: str
    shape: list[int]
    data: bytes

    def tensor(self) -> torch.Tensor:
        """The values as a (positions, d_model) tensor."""
        return torch.frombuffer(bytearray(self.data), dtype=getattr(torch, self.dtype)).view(*self.shape)


@dataclass(frozen=True)
class WorkerReply:
    """What a worker holds for one request: its readouts by SAE, or the error that stopped it."""

    error: str | None = None
    features: dict[str, Readout] = field(default_factory=dict)
    guardrails: list[dict[str, Any]] = field(default_factory=list)
    """The rules fired so far: ``guardrails.Firing`` as dicts (name, action, position, server)."""
    hidden_states: list[HiddenStates] = field(default_factory=list)
    """By layer: the positions computed since the last fetch."""

    def to_wire(self) -> dict[str, Any]:
        # Shallow: dataclasses.asdict copies every element of the value lists one by one, which
        # cost a reading benchmark 4% of its run (64 requests x 65 tokens x 32 features).
        return {"error": self.error, "features": {sae: dict(vars(r)) for sae, r in self.features.items()},
                "guardrails": self.guardrails, "hidden_states": [dict(vars(h)) for h in self.hidden_states]}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> WorkerReply:
        return cls(wire.get("error"), {sae: Readout(**r) for sae, r in (wire.get("features") or {}).items()},
                   list(wire.get("guardrails") or []), [HiddenStates(**h) for h in wire.get("hidden_states") or []])

    def merge(self, other: WorkerReply) -> WorkerReply:
        """Replies of several workers (ranks) for one request: the first error, the readouts
        of whichever rank held them (only one does: the SAE's or the layer's stage), the rules any
        of them saw fire."""
        seen = {(f["server"], f["name"]) for f in self.guardrails}
        return WorkerReply(self.error or other.error, {**self.features, **other.features},
                           self.guardrails + [f for f in other.guardrails if (f["server"], f["name"]) not in seen],
                           sorted(self.hidden_states + other.hidden_states, key=lambda h: h.layer))


def merge_replies(per_worker: list[dict[str, Any]], keys: list[str]) -> dict[str, WorkerReply]:
    """``POP_READOUTS`` answers of every worker, merged per key."""
    out = {key: WorkerReply() for key in keys}
    for worker in per_worker:
        for key, wire in (worker or {}).items():
            if key in out:
                out[key] = out[key].merge(WorkerReply.from_wire(wire))
    return out


@dataclass(frozen=True)
class WorkerCapabilities:
    """What the workers can run, learned by the API process at startup (before any admission)."""

    graph_mode: bool
    """The forward replays CUDA graphs: only the fixed-shape op runs (no top-k readouts)."""
    slots: int
    """Features one request may edit and read on one SAE in graph mode."""
    max_model_len: int
    """Longest sequence: bounds a request's readout rows."""
    secret_id: str | None = None
    """``secret_id`` of the worker's secret: every process of a deployment must share one."""
    speculative: bool = False
    """Speculative decoding is on: the forward also computes draft tokens that may be rejected."""
    stop_token: int | None = None
    """The token the sampler emits for a request a guardrail aborts: the model's EOS (None: no abort)."""
    pipeline: bool = False
    """The model is split into pipeline stages."""
    hidden_layers: tuple[int, ...] = ()
    """The layers whose hidden states a request may get back."""
    d_model: int = 0
    """Width of the residual stream: bounds a request's hidden states."""
    lanes: int = 0
    """Guardrail triggers one request may have read at one SAE in graph mode (config op.guard_lanes)."""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, request: ResolvedRequest, limits: LimitsConfig) -> None:
        """Refuse, naming the field, what these workers could not run whole or hold within ``limits``."""
        if request.guardrails:
            self._check_guardrails(request)
        if self.graph_mode:
            check_runnable(request, self.slots, self.lanes)
        if self.speculative and request.readout is not None:
            # Steering is exact there (a rejected draft's edit is discarded with it), but a readout
            # would hold rows of drafts the sampler rejected.
            raise SpecError("return_features", "feature readouts are not available on this server: it runs "
                            "speculative decoding, whose rejected draft tokens would show up in them")
        limits.check_readout(request, self.max_model_len)
        if request.hidden is not None:
            self._check_hidden_states(request, limits)

    def _check_hidden_states(self, request: ResolvedRequest, limits: LimitsConfig) -> None:
        hidden = request.hidden
        if self.speculative:
            raise SpecError("return_hidden_states", "hidden states are not available on this server: it runs "
                            "speculative decoding, whose rejected draft tokens would show up in them")
        if not isinstance(hidden.positions, str) and hidden.positions[-1] >= self.max_model_len:
            raise SpecError("return_hidden_states.positions", f"position {hidden.positions[-1]} is beyond this "
                            f"server's context length of {self.max_model_len} tokens")
        for i, layer in enumerate(hidden.layers):
            if layer not in self.hidden_layers:
                raise SpecError(f"return_hidden_states.layers[{i}]", f"layer {layer} is not exposed by this server "
                                f"(exposed: {list(self.hidden_layers)}; config hidden_states.layers)")
        limits.check_hidden_states(request, self.max_model_len, self.d_model)

    def ended_by_guardrail(self, abort_fired: bool, finish_reason: str | None, stop_reason: object) -> bool:
        """Whether an output that finished so was ended by an abort rule: one fired, and the output
        ended on EOS (or at max_tokens, under ignore_eos), not on a stop string or token of the
        client's. (A rule that fires on the model's own last EOS reads as an abort too.) The token
        the workers emit is the config's first EOS; where the tokenizer's EOS is another one (Llama
        3: 128001 of [128001, 128008, 128009], the tokenizer's 128009), vLLM stops on it as on a
        stop token, naming it as the stop reason."""
        return (abort_fired and finish_reason in ("stop", "length")
                and (stop_reason is None or stop_reason == self.stop_token))

    def _check_guardrails(self, request: ResolvedRequest) -> None:
        rule = request.guardrails[0]
        field = "server_guardrails" if rule.server else "guardrails"
        if self.speculative or self.pipeline or (self.graph_mode and not self.lanes):
            raise SpecError(field, "guardrails are not available on this server: they run without speculative "
                            "decoding or pipeline parallelism, and under CUDA graphs need config op.guard_lanes > 0")
        if self.stop_token is None and any(r.action == "abort" for r in request.guardrails):
            raise SpecError(field, "this model declares no end-of-sequence token, which an abort needs")

    @classmethod
    def from_workers(cls, answers: list[dict[str, Any] | None]) -> WorkerCapabilities | None:
        """The strictest of every worker's answer (None when no worker has SAEs). Raises when the
        workers disagree on the secret (a worker without it would silently steer nothing)."""
        got = [cls(**a) for a in answers if a]
        if not got:
            return None
        ids = {c.secret_id for c in got}
        if len(ids) != 1 or None in ids:
            raise SaeServeError(f"vLLM's workers do not share one {envs.SECRET_VAR} (set it in every process, "
                                "e.g. Ray workers' runtime_env); they would ignore every admitted spec")
        return cls(any(c.graph_mode for c in got), min(c.slots for c in got), min(c.max_model_len for c in got),
                   ids.pop(), any(c.speculative for c in got), got[0].stop_token, any(c.pipeline for c in got),
                   tuple(sorted({layer for c in got for layer in c.hidden_layers})), got[0].d_model,
                   min(c.lanes for c in got))
