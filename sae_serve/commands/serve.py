"""``sae-serve serve``: vLLM's OpenAI-compatible server with the sae_serve plugins, one command.

With no arguments it serves the embedded default model with the shipped SAE on 127.0.0.1:8000 on
the CPU. Anything after ``--`` goes to vLLM's server unchanged (e.g. ``-- --api-key K``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder or name (default: embedded SmolLM2-135M)")
    parser.add_argument("--config", type=Path, default=None, help="sae_serve config (default: the shipped SAE)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (OpenAI API, /v1/saes, /metrics)")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: HTTP port + 1; 0: none)")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: vLLM server options")


def default_config() -> Path:
    from sae_serve import envs
    from sae_serve.config import MetricsConfig, SaeServeConfig, write_config
    from sae_serve.data import DEFAULT_SAE_DIR, DEFAULT_SAE_NAME
    from sae_serve.sae.registry import SaeEntry

    path = envs.cache_dir() / "default-config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = SaeServeConfig(saes=(SaeEntry(name=DEFAULT_SAE_NAME, path=str(DEFAULT_SAE_DIR)),),
                            metrics=MetricsConfig(enabled=True))
    return write_config(config, path)


def fresh_metrics_dir() -> Path:
    """An empty PROMETHEUS_MULTIPROC_DIR for this server; those of servers no longer running go."""
    import shutil

    from sae_serve import envs

    root = envs.cache_dir() / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if not Path(f"/proc/{old.name}").exists():
            shutil.rmtree(old, ignore_errors=True)
    folder = root / str(os.getpid())  # exec keeps the pid: the folder lives as long as the server
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


SHUTDOWN_TIMEOUT_S = 30
"""On SIGTERM, requests in flight get this long to finish (vLLM's own default, 0, aborts them)."""


def server_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    from sae_serve.config import load_config
    from sae_serve.engines.protocol import ensure_secret
    from sae_serve.models import prepare_model

    config = args.config or default_config()
    load_config(config)  # a bad config fails here, with its path, not deep inside a worker
    model = args.model or str(prepare_model())
    extra = [a for a in args.vllm_args if a != "--"]
    if args.model is None and "--dtype" not in extra:
        extra += ["--dtype", "float32"]  # the embedded model's weights are float32 (dequantized GGUF)
    if not any(a.startswith("--shutdown-timeout") for a in extra):
        extra += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    ensure_secret()  # one per deployment (the Helm chart sets it from a Secret); vLLM's workers inherit it
    env = {**os.environ, "SAE_SERVE_CONFIG": str(Path(config).resolve()), "VLLM_PLUGINS": "sae_serve",
           "PROMETHEUS_MULTIPROC_DIR": str(fresh_metrics_dir()), "SAE_SERVE_GRPC_HOST": args.host,
           "SAE_SERVE_GRPC_PORT": str(grpc_port(args))}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", args.host, "--port", str(args.port), *extra]
    return cmd, env


def grpc_port(args: argparse.Namespace) -> int:
    return args.port + 1 if args.grpc_port is None else args.grpc_port


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with SO_REUSEPORT, as gRPC binds: the gRPC server starts only
    after vLLM's engine, which meanwhile opens ports of its own that could otherwise take this one."""
    from sae_serve.errors import SaeServeError

    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    reservation = socket.socket(family, kind, proto)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reservation.bind(address)
    except OSError as exc:
        reservation.close()
        raise SaeServeError(f"--grpc-port {port}: cannot bind {host}:{port} ({exc.strerror})") from exc
    reservation.set_inheritable(True)
    return reservation


def run(args: argparse.Namespace) -> int:
    from sae_serve import envs

    cmd, env = server_command(args)
    if grpc_port(args):
        env[envs.GRPC_RESERVATION_VAR] = str(reserve_port(args.host, grpc_port(args)).detach())
    else:
        del env["SAE_SERVE_GRPC_PORT"]
    print(f"sae-serve: HTTP (OpenAI API, /v1/saes) on http://{args.host}:{args.port}, "
          f"metrics on http://{args.host}:{args.port}/metrics"
          + (f", gRPC on {args.host}:{grpc_port(args)}" if grpc_port(args) else ""), flush=True)
    os.execvpe(cmd[0], cmd, env)  # vLLM's server handles SIGTERM (graceful shutdown) itself
    return 0
