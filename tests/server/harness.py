"""Shared by the server tests: starting `sae-serve serve` on 127.0.0.1 (vLLM's RemoteOpenAIServer
style: a subprocess polled on /health), HTTP and metrics helpers, and the gRPC key interceptor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

API_KEY = "test-key-7f3a"  # the test servers require it, on HTTP and gRPC
AUTH = {"authorization": f"Bearer {API_KEY}"}
FRENCH = {"steering": {"interventions": [{"sae": "layer15", "feature": "non-english", "mode": "clamp",
                                          "multiple_of_max": 1.0}]}}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: each socket stays bound until all are chosen, so two never match."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def get_json(url: str, headers: dict[str, str] = AUTH) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    grpc_address: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=90)


def start_server(config: Path, folder: Path, *vllm_args: str) -> Server:
    """`sae-serve serve` with ``config``, eager, a 1024-token context and the test API key."""
    port, grpc_port = free_ports(2)
    log = folder / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "sae_serve.cli", "serve", "--port", str(port),
                             "--grpc-port", str(grpc_port), "--config", str(config), "--",
                             "--enforce-eager", "--max-model-len", "1024", "--api-key", API_KEY, *vllm_args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    server = Server(f"http://127.0.0.1:{port}", proc, f"127.0.0.1:{grpc_port}", log)
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(server.base + "/health", timeout=2).status == 200:
                return server
        except OSError:
            time.sleep(2)
    proc.kill()
    pytest.fail("server did not become healthy")


def metric_samples(base: str, prefix: str = "sae_serve") -> list:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith(prefix)]


def metric(base: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels (0 when none)."""
    return sum(s.value for s in metric_samples(base, name.split("_")[0])
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def server_rss(proc: subprocess.Popen) -> int:
    import psutil

    def rss(p: psutil.Process) -> int:
        try:
            return p.memory_info().rss
        except psutil.NoSuchProcess:  # a helper process that exited since it was listed holds nothing
            return 0

    root = psutil.Process(proc.pid)
    return sum(rss(p) for p in [root, *root.children(recursive=True)])


class WithApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamStreamClientInterceptor):
    """Adds the API key to every call, as a client of a keyed server does."""

    @staticmethod
    def _with_key(details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), *AUTH.items()])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)
