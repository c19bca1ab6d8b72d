"""Readouts a worker holds until the API process fetches them, within bounded memory.

Each admitted request that reads gets an entry under its key. An entry holds at most
``max_values`` activations and ``max_state_bytes`` of hidden states (the limits the service
already checks up front: past them the request gets an error, never a silently short readout).
When the request leaves the runner (finished or aborted) its entry waits ``ttl_s`` seconds to be
fetched and is then dropped, so readouts that nobody fetches (a client that hung up) never pile
up. Errors (a spec a worker could not run) live in the same entries, under the same rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from sae_serve.config import LimitsConfig
from sae_serve.engines.protocol import HiddenStates, Readout, WorkerReply
from sae_serve.steering.guardrails import GuardState, firings, release
from sae_serve.steering.hook import FeatureActivations


@dataclass
class _Entry:
    chunks: dict[str, list[FeatureActivations]] = field(default_factory=dict)
    values: int = 0
    nbytes: int = 0
    error: str | None = None
    finished_at: float | None = None
    guards: list[GuardState] = field(default_factory=list)  # read when popped; kept while the request lives
    states: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # layer -> (pos, rows)
    state_bytes: int = 0  # of ``states``, all layers together


class ReadoutStore:
    def __init__(self, max_values: int, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 max_state_bytes: int = LimitsConfig().max_hidden_state_bytes) -> None:
        self.max_values = max_values
        self.max_state_bytes = max_state_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    @classmethod
    def of(cls, limits: LimitsConfig) -> ReadoutStore:
        return cls(limits.max_readout_values, limits.readout_ttl_s, max_state_bytes=limits.max_hidden_state_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of activations held, all requests together."""
        return sum(e.nbytes for e in self._entries.values())

    def add(self, key: str, sae: str, acts: FeatureActivations) -> None:
        entry = self._entries.setdefault(key, _Entry())
        if entry.error is not None:
            return
        chunks = entry.chunks.setdefault(sae, [])
        if chunks and acts.positions.numel() and chunks[-1].positions[-1] >= acts.positions[0]:
            # Positions computed again (a preempted request recomputes its tokens): the new rows count.
            self._truncate(entry, sae, int(acts.positions[0]))
            chunks = entry.chunks[sae]
        values = acts.indices.numel()
        if entry.values + values > self.max_values:
            self.fail(key, f"the readout exceeds this server's limit of {self.max_values} values per request "
                           "(config limits.max_readout_values)")
            return
        chunks.append(acts)
        entry.values += values
        entry.nbytes += _nbytes(acts)

    def add_states(self, key: str, layer: int, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Hidden states of ``layer`` at ``positions`` (host tensors, in the dtype the request asked)."""
        entry = self._entries.setdefault(key, _Entry())
        if entry.error is not None:
            return
        chunks = entry.states.setdefault(layer, [])
        if chunks and chunks[-1][0][-1] >= positions[0]:  # recomputed after a preemption: the new rows count
            first = int(positions[0])
            kept = [(p[p < first], r[p < first]) for p, r in chunks]
            dropped = sum(r.nbytes for _, r in chunks) - sum(r.nbytes for _, r in kept)
            entry.nbytes -= dropped
            entry.state_bytes -= dropped
            chunks[:] = [(p, r) for p, r in kept if p.numel()]
        if entry.state_bytes + rows.nbytes > self.max_state_bytes:
            self.fail(key, f"the hidden states exceed this server's limit of {self.max_state_bytes} bytes per "
                           "request (config limits.max_hidden_state_bytes)")
            return
        chunks.append((positions, rows))
        entry.nbytes += rows.nbytes
        entry.state_bytes += rows.nbytes

    @staticmethod
    def _truncate(entry: _Entry, sae: str, position: int) -> None:
        """Drop ``sae``'s rows at ``position`` and after."""
        old = entry.chunks[sae]
        kept = [c for c in (FeatureActivations(*(t[c.positions < position] for t in c)) for c in old)
                if c.positions.numel()]
        entry.values += sum(c.indices.numel() for c in kept) - sum(c.indices.numel() for c in old)
        entry.nbytes += sum(map(_nbytes, kept)) - sum(map(_nbytes, old))
        entry.chunks[sae] = kept

    def fail(self, key: str, error: str) -> None:
        """The request cannot be served as admitted: its readouts go, the error stays to be fetched."""
        entry = self._entries.setdefault(key, _Entry())
        entry.chunks, entry.states, entry.values, entry.nbytes, entry.state_bytes = {}, {}, 0, 0, 0
        entry.error = entry.error or error

    def resume(self, key: str) -> None:
        """The request is (again) in the runner: its entry does not expire."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.finished_at = None

    def finish(self, key: str) -> None:
        """The request left the runner: its entry now waits ``ttl_s`` to be fetched."""
        entry = self._entries.get(key)
        if entry is not None and entry.finished_at is None:
            entry.finished_at = self.clock()

    def expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        for key in [k for k, e in self._entries.items() if e.finished_at is not None and e.finished_at < cutoff]:
            release(self._entries.pop(key).guards)

    def guard(self, key: str, states: list[GuardState]) -> None:
        """The request's guardrails: every pop reports those that have fired so far."""
        if states:
            entry = self._entries.setdefault(key, _Entry())
            release(entry.guards)  # (planned again after leaving the runner: the new rows count)
            entry.guards = states

    def pop(self, key: str) -> WorkerReply:
        """The entry's readouts and error, and the rules fired so far; a live request's rules stay,
        a finished one's free their table rows."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return WorkerReply()
        fired = [asdict(f) for f in firings(entry.guards)]
        if entry.guards and entry.finished_at is None:
            self._entries[key] = _Entry(guards=entry.guards)
        else:
            release(entry.guards)
        return WorkerReply(entry.error, {sae: _readout(chunks) for sae, chunks in entry.chunks.items()}, fired,
                           [_states(layer, chunks) for layer, chunks in sorted(entry.states.items()) if chunks])


def _nbytes(acts: FeatureActivations) -> int:
    return sum(t.numel() * t.element_size() for t in acts)


def _readout(chunks: list[FeatureActivations]) -> Readout:
    return Readout(torch.cat([c.positions for c in chunks]).tolist(), torch.cat([c.indices for c in chunks]).tolist(),
                   torch.cat([c.values for c in chunks]).tolist())


def _states(layer: int, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> HiddenStates:
    rows = torch.cat([r for _, r in chunks])
    values = rows.numpy()
    return HiddenStates(layer, torch.cat([p for p, _ in chunks]).tolist(), str(rows.dtype).removeprefix("torch."),
                        list(rows.shape), values.astype(values.dtype.newbyteorder("<")).tobytes())
