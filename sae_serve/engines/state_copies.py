"""Hidden states on their way from the device to the readout store, without stalling the forward.

Per layer and step, the rows that requests read are gathered on the device and copied to pinned
host memory without waiting; an event recorded after the copy says when it has landed. The runtime
delivers landed copies to the store before each step, never waiting, and waits only when the API
process fetches readouts. On a CPU the gather is the copy.

Under CUDA graphs the op's Python never runs, so each exposed layer's op copies the whole stream
into a persistent buffer (``StateBuffers``: max_num_batched_tokens rows of d_model per layer, in the
model's dtype), and the gather runs from there before the next step: on the same stream, so after
this forward and before the next one overwrites the buffer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

import torch

from sae_serve.engines.readouts import ReadoutStore

Part = tuple[str, torch.Tensor, torch.dtype]
"""One request's share of a layer's rows: its readout key, the positions, the dtype it asked for."""


@dataclass(frozen=True)
class Capture:
    """One layer's hidden states to copy out in a step: ``rows`` of the step (on the device), in
    ``parts`` of one request each."""

    rows: torch.Tensor
    parts: list[Part]


@dataclass(frozen=True)
class _InFlight:
    layer: int
    host: torch.Tensor  # (rows, d_model), the model's dtype
    parts: list[Part]
    landed: torch.cuda.Event | None  # None: already on the host


class StateCopies:
    """Copies started and not yet delivered, oldest first (a request's rows arrive in step order)."""

    def __init__(self) -> None:
        self._flying: deque[_InFlight] = deque()

    def start(self, layer: int, states: torch.Tensor, parts: list[Part]) -> None:
        """Copy ``states`` (the gathered rows, a fresh tensor) to the host, without waiting."""
        if states.device.type != "cuda":
            self._flying.append(_InFlight(layer, states, parts, None))
            return
        host = torch.empty(states.shape, dtype=states.dtype, pin_memory=True)
        host.copy_(states, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        self._flying.append(_InFlight(layer, host, parts, landed))

    def deliver(self, store: ReadoutStore, wait_for: Collection[str] = ()) -> set[str]:
        """Hand the landed copies to ``store``, waiting for the device only for those that hold
        rows of the keys in ``wait_for``; returns the keys that got rows (or an error)."""
        last = max((i for i, copy in enumerate(self._flying) if any(k in wait_for for k, _, _ in copy.parts)),
                   default=-1)
        delivered: set[str] = set()
        while self._flying:
            copy = self._flying[0]
            if copy.landed is not None:
                if last < 0 and not copy.landed.query():
                    break
                copy.landed.synchronize()
            self._flying.popleft()
            last -= 1
            start = 0
            for key, positions, dtype in copy.parts:
                end = start + positions.numel()
                rows, start = copy.host[start:end], end
                delivered.add(key)
                wanted = rows.to(dtype, copy=True)  # (a copy: the store keeps no part of a step's pinned block)
                narrowed = dtype == torch.float16 and rows.dtype != dtype  # (the one cast that can overflow)
                if narrowed and wanted.isinf().any() and not rows.isinf().any():
                    store.fail(key, f"the hidden states at layer {copy.layer} exceed float16's range (this "
                               "model's stream holds larger values): ask for return_hidden_states.dtype float32")
                    continue
                store.add_states(key, copy.layer, positions, wanted)
        return delivered


class StateBuffers:
    """Graph mode: one persistent buffer per exposed layer that the op copies the stream into."""

    def __init__(self, layers: tuple[int, ...], tokens: int, d_model: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.buffers = {layer: torch.zeros(tokens, d_model, dtype=dtype, device=device) for layer in layers}

    def record(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """The op's part: the step's whole stream (padded rows too), a fixed shape per batch size."""
        torch.add(hidden, residual, out=self.buffers[layer][: hidden.shape[0]])

    def gather(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        return self.buffers[layer][rows]
