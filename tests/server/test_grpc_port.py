"""The gRPC port `sae-serve serve` reserves before vLLM starts (vLLM's engine opens ports of its own
while loading, before the gRPC server binds): nothing else may take it, gRPC can, and a port already
in use is refused at once, naming the flag."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sae_serve.commands.serve import reserve_port
from sae_serve.errors import SaeServeError


def test_a_reserved_port_refuses_other_binders_but_takes_grpc() -> None:
    reservation = reserve_port("127.0.0.1", 0)
    port = reservation.getsockname()[1]
    with socket.socket() as other, pytest.raises(OSError):  # e.g. vLLM's ZMQ sockets, or its port picker
        other.bind(("127.0.0.1", port))

    async def serve_and_check() -> int:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        reservation.close()
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                return reply.status
        finally:
            await server.stop(0)

    assert asyncio.run(serve_and_check()) == health_pb2.HealthCheckResponse.SERVING


def test_a_port_in_use_is_refused_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SaeServeError, match=rf"--grpc-port {port}: cannot bind 127.0.0.1:{port}"):
            reserve_port("127.0.0.1", port)
