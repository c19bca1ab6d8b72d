"""One sequence per engine request, for requests the workers watch per sequence.

An OpenAI request can run several sequences (``n``, a ``prompt`` list). vLLM gives them one set of
``extra_args``, so the workers could not tell them apart, while a readout, hidden states and
guardrails belong to one sequence. Such a request is sent to vLLM's handler as one request per
sequence (``n`` = 1, child ``j`` seeded ``seed + j`` as vLLM seeds its children), each admitted under
its own readout key, and the answers are merged back into the response the client asked for:
choices in vLLM's order (prompt-major, then ``n``), each with its own ``sae`` object, one usage.
vLLM's V1 engine runs the children of ``n`` as independent requests too; what differs is the
prompt, which each sequence that reads or is watched computes itself (its own cache salt: its
readout and rules must see it computed), so ``limits.max_sequences`` bounds how many.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTasks


@dataclass(frozen=True)
class Part:
    """One sequence of a request, as a request of its own."""

    request: Any
    index: int
    """Its choice's index in the merged response."""
    prompt: int
    """The prompt it completes (usage counts each prompt's tokens once)."""


def _prompts(request: Any) -> list[Any] | None:
    """A completion request's prompt list (None: one prompt, or a chat request)."""
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return prompt
    return None


def unsplittable(request: Any) -> dict[str, int]:
    """The fields that run several sequences this module does not split, and how many: beam search
    (vLLM builds its own sampling params), ``prompt_embeds`` beside other prompts, and a
    disaggregated prefill's ``kv_transfer_params`` (one transfer, not one per sequence)."""
    embeds = getattr(request, "prompt_embeds", None)
    sequences = 0
    if embeds is not None:
        texts = len(_prompts(request) or ()) or (1 if getattr(request, "prompt", None) else 0)
        sequences = texts + (len(embeds) if isinstance(embeds, list) else 1)
    transfer = sequence_count(request)[1] if getattr(request, "kv_transfer_params", None) else 0
    return {"prompt_embeds": sequences, "use_beam_search": int(bool(request.use_beam_search)),
            "kv_transfer_params": transfer}


GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it samples greedily


def _n(request: Any) -> int:
    """The request's ``n`` as it is split; 1 where vLLM would not run it (``n`` below 1, or above 1
    with greedy sampling): such a request is sent whole, for vLLM's own 400."""
    n = request.n if request.n is not None else 1
    greedy = request.temperature is not None and request.temperature < GREEDY_BELOW
    return n if n >= 1 and (n == 1 or not greedy) else 1


def sequence_count(request: Any) -> tuple[str, int]:
    """How many sequences the request runs, and the field that makes them several."""
    n, prompts = _n(request), len(_prompts(request) or [None])
    return ("n" if n > 1 else "prompt"), n * prompts


def split(request: Any) -> list[Part]:
    """``request`` as one request per sequence (just itself when it runs one)."""
    prompts, n = _prompts(request) or [None], _n(request)
    if n == 1 and len(prompts) == 1:
        return [Part(request, 0, 0)]
    parts = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            update: dict[str, Any] = {"n": 1}
            if prompt is not None:
                update["prompt"] = prompt
            if request.seed is not None:
                update["seed"] = request.seed + j
            parts.append(Part(request.model_copy(update=update), p * n + j, p))
    return parts


def _summed(values: list[Any]) -> Any:
    """Usage values added up: numbers summed, objects key by key (None where every value is None)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], dict):
        return {key: _summed([v.get(key) for v in present if isinstance(v, dict)]) for key in present[0]}
    return sum(present) if all(isinstance(v, int | float) for v in present) else present[0]


def _usage(parts: list[Part], usages: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The parts' usage as one request's: each prompt's tokens once, every choice's completion."""
    per_prompt: dict[int, dict[str, Any]] = {}
    for i, usage in sorted(usages.items()):
        per_prompt.setdefault(parts[i].prompt, usage)
    merged = {key: _summed([u.get(key) for u in usages.values()]) for key in next(iter(usages.values()))}
    for key in ("prompt_tokens", "prompt_tokens_details"):
        if key in merged:
            merged[key] = _summed([u.get(key) for u in per_prompt.values()])
    merged["total_tokens"] = (merged.get("prompt_tokens") or 0) + (merged.get("completion_tokens") or 0)
    return merged


def _own_choice(part: Part, body: dict[str, Any]) -> None:
    """A part's answer (or chunk) renumbered as its choice of the whole, its ``sae`` object inside it."""
    sae = body.pop("sae", None)
    for choice in body.get("choices") or ():
        choice["index"] = part.index
        if sae is not None:
            choice["sae"] = sae


def merge_bodies(parts: list[Part], bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts' JSON answers as the one the client asked for (vLLM reports no per-request
    ``metrics`` for several sequences)."""
    merged = {**bodies[0], "choices": []}
    merged.pop("sae", None)
    merged.pop("metrics", None)
    for part, body in zip(parts, bodies, strict=True):
        _own_choice(part, body)
        merged["choices"] += body["choices"]
    if all(body.get("usage") for body in bodies):
        merged["usage"] = _usage(parts, {i: body["usage"] for i, body in enumerate(bodies)})
    return merged


async def merge_streams(parts: list[Part], streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The parts' SSE streams as one, events in the order they come: choices renumbered, one id
    and creation time, the usage-only chunk once at the end, summed (a choice chunk's running usage
    stays its own choice's, as vLLM reports it), one ``[DONE]``. A part's error event ends the
    whole stream, as an error ends vLLM's."""
    usages: dict[int, dict[str, Any]] = {}
    usage_chunk: dict[str, Any] | None = None
    first: dict[str, Any] = {}
    pending = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    chunk = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                out = []
                for event in (chunk if isinstance(chunk, str) else chunk.decode()).split("\n\n"):
                    if not event or event == "data: [DONE]":
                        continue
                    if not event.startswith("data: {"):  # an SSE comment (keep-alive)
                        out.append(event)
                        continue
                    body = json.loads(event.removeprefix("data: "))
                    if "error" in body and not body.get("choices"):
                        yield "\n\n".join([*out, event, "data: [DONE]"]) + "\n\n"
                        return
                    for key in ("id", "created"):
                        body[key] = first.setdefault(key, body.get(key))
                    body.pop("metrics", None)
                    if not body.get("choices"):  # the usage-only chunk: one, after every part's
                        usages[i], usage_chunk = body.get("usage") or {}, body
                        continue
                    _own_choice(parts[i], body)
                    out.append("data: " + json.dumps(body))
                if out:
                    yield "\n\n".join(out) + "\n\n"
        if usage_chunk is not None:
            yield f"data: {json.dumps({**usage_chunk, 'usage': _usage(parts, usages)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client hung up, or a part failed: every part ends (and drops what the workers hold)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]


def _ok(answer: object) -> bool:
    return isinstance(answer, StreamingResponse) or (isinstance(answer, JSONResponse) and answer.status_code == 200)


async def _answers(coros: list[Coroutine[Any, Any, Response | None]]) -> tuple[list[Any], Any]:
    """Every part's answer, or the first failure as soon as it comes (the parts still running are
    cancelled: they drop what the workers hold); (answers so far, the failure or None)."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    pending, failure = set(tasks), None
    try:
        while pending and failure is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task in done and failure is None and not task.cancelled() and not _ok(
                        got := task.exception() or task.result()):
                    failure = got
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    answers = [task.result() for task in tasks if task.done() and not task.cancelled() and task.exception() is None]
    return answers, failure


def _background(answers: list[Any]) -> BackgroundTasks:
    """The parts' background tasks (vLLM's server-load count decrements), run by the one answer."""
    tasks = BackgroundTasks()
    for answer in answers:
        if isinstance(answer, Response) and answer.background is not None:
            tasks.add_task(answer.background)
    return tasks


async def merge(parts: list[Part], coros: list[Coroutine[Any, Any, Response | None]]) -> Response | None:
    """Run the parts (each answer already carries its ``sae`` object) and answer as the client's
    one request: merged when every part succeeded, else the first failure."""
    answers, failure = await _answers(coros)
    if failure is not None or None in answers:  # (None: vLLM's answer to a client that hung up)
        for answer in answers:
            if isinstance(answer, StreamingResponse):
                await answer.body_iterator.aclose()  # type: ignore[attr-defined]
        await _background([a for a in answers if a is not failure])()
        if isinstance(failure, BaseException):
            raise failure
        return failure
    first = answers[0]
    headers = {k: v for k, v in first.headers.items() if k.lower() not in ("content-length", "content-type")}
    if isinstance(first, StreamingResponse):
        return StreamingResponse(merge_streams(parts, [a.body_iterator for a in answers]),
                                 media_type="text/event-stream", headers=headers, background=_background(answers))
    bodies = [json.loads(answer.body) for answer in answers]
    return JSONResponse(merge_bodies(parts, bodies), headers=headers, background=_background(answers))
