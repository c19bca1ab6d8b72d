"""The sae_serve config file (YAML or JSON): which SAEs and steering vectors to attach.

Read by the vLLM plugin in every worker (path in SAE_SERVE_CONFIG) and by the clients that
validate requests before they reach the engine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_serve import envs
from sae_serve.errors import SaeFormatError
from sae_serve.sae.registry import RegistryConfig
from sae_serve.steering.policy import Policy


class MetricsConfig(BaseModel):
    """Prometheus monitoring of each SAE's watchlist on every token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Compute watched features on every token and export metrics (``sae-serve serve`` turns it on)."""
    firing_fraction_of_max: float = Field(default=0.25, gt=0, le=1)
    """A watched feature 'fires' on a token above this fraction of its max activation."""


class SaeServeConfig(RegistryConfig):
    """The whole config file: ``saes``, ``vectors``, the serving ``policy`` and ``metrics``."""

    policy: Policy = Policy()
    """What requests may do on the API server (offline use through SteeredLLM is trusted)."""
    metrics: MetricsConfig = MetricsConfig()
    """Feature monitoring."""


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
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise SaeFormatError(path, f"field {where}: {err['msg']}") from None


def config_from_env() -> SaeServeConfig | None:
    """The config named by SAE_SERVE_CONFIG, or None when it is unset."""
    path = envs.plugin_config_path()
    return load_config(path) if path else None


def write_config(config: SaeServeConfig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.write_text(config.model_dump_json(indent=1))
    return path
