"""Every environment variable sae_serve reads, in one place (as vLLM's envs.py does)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """SAE_SERVE_CACHE: where converted models and harvested activations live."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae_serve"
    return Path(os.environ.get("SAE_SERVE_CACHE", default))


def plugin_config_path() -> str | None:
    """SAE_SERVE_CONFIG: the config file the vLLM plugin reads in every worker."""
    return os.environ.get("SAE_SERVE_CONFIG") or None


def grpc_address() -> tuple[str, int] | None:
    """SAE_SERVE_GRPC_HOST / SAE_SERVE_GRPC_PORT: where the API server also serves gRPC (unset: no gRPC)."""
    port = os.environ.get("SAE_SERVE_GRPC_PORT")
    return (os.environ.get("SAE_SERVE_GRPC_HOST", "127.0.0.1"), int(port)) if port else None


GRPC_RESERVATION_VAR = "SAE_SERVE_GRPC_RESERVED_FD"


def grpc_reservation() -> int | None:
    """SAE_SERVE_GRPC_RESERVED_FD: a socket `sae-serve serve` bound to the gRPC port before vLLM
    started, so that none of vLLM's own ports can take it; the gRPC server closes it once bound."""
    fd = os.environ.get(GRPC_RESERVATION_VAR)
    return int(fd) if fd else None


def vllm_api_key() -> str | None:
    """vLLM's own VLLM_API_KEY (the HTTP key when --api-key is not given), which gRPC takes too."""
    return os.environ.get("VLLM_API_KEY") or None


SECRET_VAR = "SAE_SERVE_SECRET"


def deployment_secret() -> str | None:
    """SAE_SERVE_SECRET: the key with which the service signs admitted specs and the workers check
    them. Every process of a deployment needs the same one; unset, workers take no steering."""
    return os.environ.get(SECRET_VAR) or None
