"""The sae_serve config file (YAML or JSON): which SAEs and steering vectors to attach.

Read by the vLLM plugin in every worker (path in SAE_SERVE_CONFIG) and by the clients that
validate requests before they reach the engine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sae_serve import envs
from sae_serve.errors import SaeFormatError, SpecError, first_field_error
from sae_serve.sae.registry import RegistryConfig
from sae_serve.steering.policy import Policy
from sae_serve.steering.spec import MAX_GUARDRAILS, Guardrail, ResolvedRequest


class MetricsConfig(BaseModel):
    """Prometheus monitoring of each SAE's watchlist on every token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Compute watched features on every token and export metrics (``sae-serve serve`` turns it on)."""
    firing_fraction_of_max: float = Field(default=0.25, gt=0, le=1)
    """A watched feature 'fires' on a token above this fraction of its max activation."""


class OpConfig(BaseModel):
    """How the engine runs the steering op."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fixed_shapes: bool = False
    """Use the fixed-shape op (persistent tables, CUDA-graph shapes) for requests that fit it;
    the rest take the segment path. With CUDA graphs the fixed op is the only one."""
    slots: int = Field(default=16, ge=1, le=1024)
    """Features one request may edit and read on one SAE in the fixed-shape op (its guardrails'
    triggers and edits included). With CUDA graphs the servers refuse more; otherwise such a request
    takes the segment path."""
    guard_lanes: int = Field(default=4, ge=0, le=64)
    """Guardrail triggers one request may have read at one SAE in the fixed-shape op (its own rules
    and the server's). 0: no guardrails on that op (with CUDA graphs, none at all)."""


class HiddenStatesConfig(BaseModel):
    """Which decoder layers' residual stream requests may get back (``return_hidden_states``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: tuple[Annotated[int, Field(ge=0)], ...] = ()
    """Layers the workers expose besides their SAEs' (always exposed: the SAE's op reads them anyway).
    Each costs a call of the op on every step, returning at once when nobody reads it. Under CUDA
    graphs only these are exposed (not the SAEs' layers), and each one's op copies its stream into
    a persistent buffer every step (max_num_batched_tokens x d_model in the model's dtype)."""
    stop_after: int | None = Field(default=None, ge=0)
    """Run the decoder layers only up to this one (``sae-serve harvest --engine vllm``: the later
    layers would be wasted work). Tokens sampled then are meaningless: never set it on a server."""


class LimitsConfig(BaseModel):
    """Resource limits on what one request may make the workers hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_readout_values: int = Field(default=524_288, ge=1)
    """Feature activations one request may get back: features per token times the most tokens it
    can have (the model's context length). More is refused up front (400); the workers hold no
    more than this per request either."""
    max_hidden_state_bytes: int = Field(default=4 * 2**20, ge=1)
    """Bytes of hidden states one request may get back: layers times positions (the model's context
    length for ``all``) times d_model times the dtype's size. More is refused up front (400)."""
    max_sequences: int = Field(default=64, ge=1)
    """Sequences (``n`` x prompts) one request that reads or is watched may run: each is its own
    engine request, with its own readout within the limits above and its own prompt computation."""
    readout_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    """Seconds a finished request's readout waits on the workers to be fetched, then is dropped."""

    def check_hidden_states(self, request: ResolvedRequest, max_model_len: int, d_model: int) -> None:
        hidden = request.hidden
        if hidden is None:
            return
        size = len(hidden.layers) * hidden.count(max_model_len) * d_model * (2 if hidden.dtype == "float16" else 4)
        if size > self.max_hidden_state_bytes:
            raise SpecError("return_hidden_states", f"{len(hidden.layers)} layers x {hidden.count(max_model_len)} "
                            f"positions x {d_model} {hidden.dtype} values is {size} bytes, over this server's "
                            f"limit of {self.max_hidden_state_bytes} (config limits.max_hidden_state_bytes)")

    def check_readout(self, request: ResolvedRequest, max_model_len: int) -> None:
        readout = request.readout
        if readout is None:
            return
        per_token = readout.top_k if readout.top_k is not None else len(readout.features or ())
        values = per_token * max_model_len
        if values > self.max_readout_values:
            field = "return_features.top_k" if readout.top_k is not None else "return_features.features"
            raise SpecError(field, f"{per_token} features per token over up to {max_model_len} tokens is "
                            f"{values} values, over this "
                            f"server's limit of {self.max_readout_values} (config limits.max_readout_values)")


class SaeServeConfig(RegistryConfig):
    """The whole config file: ``saes``, ``vectors``, the serving ``policy``, ``metrics`` and ``op``."""

    policy: Policy = Policy()
    """What requests may do on the API server (offline use through SteeredLLM is trusted)."""
    metrics: MetricsConfig = MetricsConfig()
    """Feature monitoring."""
    op: OpConfig = OpConfig()
    """The steering op."""
    limits: LimitsConfig = LimitsConfig()
    """Resource limits per request."""
    hidden_states: HiddenStatesConfig = HiddenStatesConfig()
    """The layers whose hidden states requests may read."""
    guardrails: tuple[Guardrail, ...] = Field(default=(), max_length=MAX_GUARDRAILS)
    """Server-wide guardrails: on every request, whatever it asks; clients see them only when
    ``policy.reveal_server_guardrails`` (an abort shows as finish_reason content_filter). They
    abort or flag: a server-wide steer could be undone by a request's own steering of the feature."""

    @field_validator("guardrails")
    @classmethod
    def _abort_or_flag(cls, rules: tuple[Guardrail, ...]) -> tuple[Guardrail, ...]:
        for rule in rules:
            if rule.action == "steer":
                raise ValueError(f"rule {rule.name!r}: a server-wide guardrail aborts or flags (a request's own "
                                 "steering of the same feature could undo a server-wide steer)")
        return rules


def load_config(path: str | os.PathLike[str]) -> SaeServeConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SaeFormatError(path, f"cannot read the config file ({exc.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SaeFormatError(path, f"not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") from None
    try:
        return SaeServeConfig.model_validate(data or {})
    except ValidationError as exc:
        raise SaeFormatError(path, first_field_error(exc)) from None


def config_from_env() -> SaeServeConfig | None:
    """The config named by SAE_SERVE_CONFIG, or None when it is unset."""
    path = envs.plugin_config_path()
    return load_config(path) if path else None


def write_config(config: SaeServeConfig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.write_text(config.model_dump_json(indent=1))
    return path
