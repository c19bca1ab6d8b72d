"""The service fetches what the workers hold for many requests in one call: the streams of one
engine step ask together. The engine stands in as its ``collective_rpc`` (what is measured is
how many calls the service makes; the real server runs every other test)."""

from __future__ import annotations

import asyncio

import pytest

from sae_serve.config import SaeServeConfig
from sae_serve.engines.protocol import WorkerReply
from sae_serve.sae.formats import save_sae
from sae_serve.sae.registry import SaeEntry
from sae_serve.server.service import SteeringService
from sae_serve.steering.spec import RequestSpec
from tests.conftest import make_sae


class Engine:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    async def collective_rpc(self, method: str, args: tuple) -> list[dict]:
        self.calls.append(list(args[0]))
        await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("engine dead")
        return [{key: WorkerReply(guardrails=[{"name": key, "action": "flag", "position": 1, "server": False}]
                                  ).to_wire() for key in args[0]}]


@pytest.fixture
def service(tmp_path) -> SteeringService:
    save_sae(make_sae("relu", 16, 32), tmp_path / "s")
    return SteeringService(SaeServeConfig(saes=(SaeEntry(name="s", path=str(tmp_path / "s")),)))


def test_concurrent_collects_share_one_call_and_each_gets_its_own_reply(service) -> None:
    spec = RequestSpec.model_validate({"guardrails": [{"name": "g", "action": "flag", "when": {
        "sae": "s", "feature": 1, "above": {"value": 1.0}}}]})
    prepared = [service.prepare(spec) for _ in range(16)]
    engine = Engine()

    async def run():
        first = await asyncio.gather(*(service.collect(engine, p) for p in prepared))
        second = await service.collect(engine, prepared[0])  # a later one gets a call of its own
        return first, second

    first, second = asyncio.run(run())
    assert len(engine.calls) == 2 and sorted(engine.calls[0]) == sorted(p.engine.key for p in prepared)
    assert [c.guardrails[0]["name"] for c in first] == [p.engine.key for p in prepared]
    assert second.guardrails[0]["name"] == prepared[0].engine.key


def test_a_failed_call_fails_every_request_in_it_and_the_next_call_works(service) -> None:
    spec = RequestSpec.model_validate({"return_hidden_states": {"layers": [1]}})
    prepared = [service.prepare(spec) for _ in range(3)]

    async def run():
        failed = await asyncio.gather(*(service.collect(Engine(fail=True), p) for p in prepared),
                                      return_exceptions=True)
        return failed, await service.collect(Engine(), prepared[0])

    failed, after = asyncio.run(run())
    assert all(isinstance(f, RuntimeError) for f in failed) and after.hidden_states == []
