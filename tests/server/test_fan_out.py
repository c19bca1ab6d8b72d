"""A request that runs several sequences, as one request per sequence and back (fan_out.py), on vLLM's
own request models. The servers' end-to-end tests (test_guardrails.py, test_serve.py) run it for real."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from sae_serve.server.fan_out import merge, merge_bodies, merge_streams, sequence_count, split, unsplittable


def _request(**fields):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest(model="m", **fields)


def test_a_request_splits_prompt_major_with_vllms_child_seeds() -> None:
    parts = split(_request(prompt=["a", "b"], n=2, seed=7, max_tokens=3))
    assert [(p.index, p.prompt, p.request.prompt, p.request.n, p.request.seed) for p in parts] == [
        (0, 0, "a", 1, 7), (1, 0, "a", 1, 8), (2, 1, "b", 1, 7), (3, 1, "b", 1, 8)]
    assert all(p.request.max_tokens == 3 for p in parts)
    assert [p.request.prompt for p in split(_request(prompt=[[5, 6], [7]]))] == [[5, 6], [7]]
    one = _request(prompt=[1, 2, 3])  # token ids: one prompt
    assert [p.request for p in split(one)] == [one]
    assert [p.request.prompt for p in split(_request(prompt=[1, 2, 3], n=2))] == [[1, 2, 3]] * 2
    assert unsplittable(_request(prompt="a", n=4)) == {"prompt_embeds": 0, "use_beam_search": 0,
                                                       "kv_transfer_params": 0}
    assert sequence_count(_request(prompt=["a", "b"], n=3, temperature=1.0)) == ("n", 6)
    greedy = _request(prompt="a", n=2, temperature=0)  # vLLM's own 400: sent whole
    assert [p.request for p in split(greedy)] == [greedy] and sequence_count(greedy) == ("prompt", 1)
    nearly = _request(prompt="a", n=2, temperature=1e-6)  # greedy to vLLM too (below its 1e-5)
    assert [p.request for p in split(nearly)] == [nearly]
    assert [p.request.n for p in split(_request(prompt="a", n=-1))] == [-1]


def test_answers_merge_into_one_with_each_prompts_tokens_counted_once() -> None:
    parts = split(_request(prompt=["a", "b"], n=2))
    bodies = [{"id": f"cmpl-{i}", "choices": [{"index": 0, "text": f"t{i}"}], "sae": {"applied": [], "k": i},
               "usage": {"prompt_tokens": 5 + 2 * (i // 2), "completion_tokens": i + 1, "total_tokens": 0,
                         "prompt_tokens_details": {"cached_tokens": i // 2, "audio": None},
                         "completion_tokens_details": {"reasoning_tokens": 1}}, "metrics": {"i": i}}
              for i in range(4)]
    merged = merge_bodies(parts, bodies)
    assert merged["id"] == "cmpl-0" and "sae" not in merged and "metrics" not in merged
    assert [(c["index"], c["text"], c["sae"]["k"]) for c in merged["choices"]] == [(i, f"t{i}", i) for i in range(4)]
    assert merged["usage"] == {"prompt_tokens": 5 + 7, "completion_tokens": 10, "total_tokens": 22,
                               "prompt_tokens_details": {"cached_tokens": 0 + 1, "audio": None},
                               "completion_tokens_details": {"reasoning_tokens": 4}}


async def _events(i: int, closed: list[int], fail: bool = False, hang: bool = False) -> AsyncIterator[str]:
    try:
        yield f'data: {{"id": "s{i}", "choices": [{{"index": 0, "text": "a{i}"}}]}}\n\n'
        await asyncio.sleep(0.01 * i)
        if fail:
            yield 'data: {"error": {"message": "worker failed", "code": 500}}\n\n'
        yield (f'data: {{"id": "s{i}", "choices": [{{"index": 0, "text": "b{i}", "finish_reason": "length"}}], '
               f'"sae": {{"k": {i}}}}}\n\n')
        usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
        yield f'data: {json.dumps({"id": f"s{i}", "choices": [], "usage": usage})}\n\ndata: [DONE]\n\n'
        if hang:
            await asyncio.sleep(10)
    finally:
        closed.append(i)


async def _collect(stream: AsyncIterator[str]) -> list[str]:
    return [event for chunk in [c async for c in stream] for event in chunk.split("\n\n") if event]


def test_streams_merge_renumbered_with_one_usage_and_one_done() -> None:
    parts = split(_request(prompt="a", n=3, stream=True))
    closed: list[int] = []

    async def run() -> list[str]:
        streams = [_events(i, closed) for i in range(3)]
        return await asyncio.wait_for(_collect(merge_streams(parts, streams)), 5)

    events = asyncio.run(run())
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    bodies = [json.loads(e[6:]) for e in events[:-1]]
    assert len({b["id"] for b in bodies}) == 1
    final = {c["index"]: c for b in bodies for c in b["choices"] if c.get("finish_reason")}
    assert {i: (c["text"], c["sae"]["k"]) for i, c in final.items()} == {i: (f"b{i}", i) for i in range(3)}
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_a_parts_error_ends_the_stream_and_every_part() -> None:
    parts = split(_request(prompt="a", n=3, stream=True))
    closed: list[int] = []

    async def run() -> list[str]:
        streams = [_events(i, closed, fail=i == 1, hang=i != 1) for i in range(3)]
        return await asyncio.wait_for(_collect(merge_streams(parts, streams)), 5)

    events = asyncio.run(run())
    assert json.loads(events[-2][6:])["error"]["message"] == "worker failed" and events[-1] == "data: [DONE]"
    assert sorted(closed) == [0, 1, 2]  # the parts still running were ended (their readouts dropped)

    async def hang_up() -> None:  # the client leaves after the first chunk
        merged = merge_streams(parts, [_events(i, closed, hang=True) for i in range(3)])
        await anext(merged)
        await merged.aclose()

    closed.clear()
    asyncio.run(hang_up())
    assert sorted(closed) == [0, 1, 2]


def test_a_part_whose_client_left_ends_the_merge_without_an_answer() -> None:
    from fastapi.responses import JSONResponse

    parts = split(_request(prompt="a", n=2))
    ran: list[int] = []

    async def part(i: int):  # vLLM's with_cancellation answers None to a client that hung up
        if i == 1:
            return None
        return JSONResponse({"id": "c", "choices": [{"index": 0, "text": "x"}]}, background=lambda: ran.append(i))

    assert asyncio.run(merge(parts, [part(i) for i in range(2)])) is None
    assert ran == [0]  # the answered part's own background task (vLLM's load count) still ran
