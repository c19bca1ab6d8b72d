"""Python stubs for protos/sae_serve.proto, generated with grpcio-tools at first use and cached
by the proto's hash (never hand-edited, never committed)."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from types import ModuleType

from sae_serve import envs

PROTO = Path(__file__).resolve().parents[1] / "protos" / "sae_serve.proto"  # protos/ at the root links here


def load() -> tuple[ModuleType, ModuleType]:
    """(sae_serve_pb2, sae_serve_pb2_grpc)."""
    from grpc_tools import protoc

    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    out = envs.cache_dir() / "grpc" / digest
    if not (out / "sae_serve_pb2_grpc.py").exists():
        out.mkdir(parents=True, exist_ok=True)
        code = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out}", f"--grpc_python_out={out}",
                            PROTO.name])
        if code != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module("sae_serve_pb2"), importlib.import_module("sae_serve_pb2_grpc")
