"""One sequence per engine request, for requests the workers watch per sequence.

An OpenAI request can run several sequences (``n``, a ``prompt`` list). vLLM gives them one set of
``extra_args``, so the workers could not tell them apart, while a readout, hidden states and
guardrails belong to one sequence. Such a request is sent to vLLM's handler as one request per
sequence (``n`` = 1, child ``j`` seeded ``seed + j`` as vLLM seeds its children), each admitted under
its own readout key, and the answers are merged back into the response the client asked for:
choices in vLLM's order (prompt-major, then ``n``), each with its own ``sae`` object, one usage.
vLLM's V1 engine runs the children of ``n`` as independent requests too, so the engine does the
same work either way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse


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
    (vLLM builds its own sampling params), and ``prompt_embeds`` beside other prompts."""
    embeds = getattr(request, "prompt_embeds", None)
    sequences = 0
    if embeds is not None:
        texts = len(_prompts(request) or ()) or (1 if getattr(request, "prompt", None) else 0)
        sequences = texts + (len(embeds) if isinstance(embeds, list) else 1)
    return {"prompt_embeds": sequences, "use_beam_search": int(bool(request.use_beam_search))}


def split(request: Any) -> list[Part]:
    """``request`` as one request per sequence (just itself when it runs one)."""
    prompts = _prompts(request) or [None]
    n = request.n or 1
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


def _usage(parts: list[Part], usages: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The parts' usage as one request's: each prompt's tokens once, every choice's completion."""
    per_prompt: dict[int, dict[str, Any]] = {}
    completion = 0
    for i, usage in sorted(usages.items()):
        per_prompt.setdefault(parts[i].prompt, usage)
        completion += usage.get("completion_tokens") or 0
    prompt = sum(usage.get("prompt_tokens") or 0 for usage in per_prompt.values())
    merged: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}
    cached = [details["cached_tokens"] for usage in per_prompt.values()
              if (details := usage.get("prompt_tokens_details")) and details.get("cached_tokens") is not None]
    if cached:
        merged["prompt_tokens_details"] = {"cached_tokens": sum(cached)}
    return merged


def _own_choice(part: Part, body: dict[str, Any]) -> None:
    """A part's answer (or chunk) renumbered as its choice of the whole, its ``sae`` object inside it."""
    sae = body.pop("sae", None)
    for choice in body.get("choices") or ():
        choice["index"] = part.index
        if sae is not None:
            choice["sae"] = sae


def merge_bodies(parts: list[Part], bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts' JSON answers as the one the client asked for."""
    merged = {**bodies[0], "choices": []}
    merged.pop("sae", None)
    for part, body in zip(parts, bodies, strict=True):
        _own_choice(part, body)
        merged["choices"] += body["choices"]
    if all(body.get("usage") for body in bodies):
        merged["usage"] = _usage(parts, {i: body["usage"] for i, body in enumerate(bodies)})
    return merged


async def merge_streams(parts: list[Part], streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The parts' SSE streams as one, events in the order they come: choices renumbered, one id,
    usage summed (a chunk's running usage over all parts; the usage-only chunk once, at the end),
    one ``[DONE]``. A part's error event ends the whole stream, as an error ends vLLM's."""
    usages: dict[int, dict[str, Any]] = {}
    usage_chunk: dict[str, Any] | None = None
    stream_id: str | None = None
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
                        yield f"{event}\n\ndata: [DONE]\n\n"
                        return
                    stream_id = stream_id or body.get("id")
                    body["id"] = stream_id
                    if body.get("usage"):
                        usages[i] = body["usage"]
                        body["usage"] = _usage(parts, usages)
                    if not body.get("choices"):  # the usage-only chunk: one, after every part's
                        usage_chunk = body
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


async def merge(parts: list[Part], answers: list[Response | BaseException | None]) -> Response | None:
    """The parts' answers (each already carrying its ``sae`` object) as the client's one: merged
    when every part succeeded, else the first failure (the other parts dropped)."""
    def ok(answer: object) -> bool:
        return isinstance(answer, StreamingResponse) or (isinstance(answer, JSONResponse) and answer.status_code == 200)

    failed = [answer for answer in answers if not ok(answer)]
    if failed:
        for answer in answers:
            if isinstance(answer, StreamingResponse):
                await answer.body_iterator.aclose()  # type: ignore[attr-defined]
        if isinstance(failed[0], BaseException):
            raise failed[0]
        return failed[0]
    first = answers[0]
    headers = {k: v for k, v in first.headers.items() if k.lower() not in ("content-length", "content-type")}
    if isinstance(first, StreamingResponse):
        return StreamingResponse(merge_streams(parts, [a.body_iterator for a in answers]),  # type: ignore[union-attr]
                                 media_type="text/event-stream", headers=headers)
    bodies = [json.loads(answer.body) for answer in answers]  # type: ignore[union-attr]
    return JSONResponse(merge_bodies(parts, bodies), headers=headers)
