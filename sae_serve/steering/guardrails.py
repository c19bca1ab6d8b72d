"""Guardrails in the forward pass: each rule's trigger is read on a request's tokens at its SAE's
site, and a steer rule's edit switches on from the token where it fired.

A rule fires at the first token (in its ``positions``) where at least ``tokens`` of the last
``window`` such tokens were above its threshold. Every live rule of an engine keeps its state in
one table on the device (``GuardTable``: where it fired, and its last watched above/below bits),
and each step updates every rule read at a site at once, with a fixed number of tensor operations
whatever the number of requests and rules, and no step waits for the host to decide. What a rule
then does:
- ``steer``: its edits apply to every token from the firing one on (``GuardState.gate``), at the
  trigger's SAE or a later layer, so tokens before it are exactly the unsteered run's;
- ``abort``: the engine's sampler emits the model's end-of-sequence token for the request from then
  on, so vLLM ends it there through its own stop check (with ``ignore_eos``, at ``max_tokens``, every
  token after the firing one an unshown EOS);
- ``flag``: nothing changes; the position is reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sae_serve.errors import SaeServeError
from sae_serve.sae.registry import LinearProbe
from sae_serve.steering.spec import MAX_WINDOW, ResolvedGuardrail

logger = logging.getLogger(__name__)

HISTORY = MAX_WINDOW - 1
"""Watched bits kept per rule (newest last): a window of n reads the last n - 1 of them."""


class GuardTableFull(SaeServeError):
    """A table that cannot grow (CUDA graphs hold its address) has no free row for a rule."""


class GuardTable:
    """The state of every live rule of one engine, on one device; a rule's state is one row (slot).
    Two rows no rule owns: 0, a sink (the fixed-shape op points its unused lanes there; its
    ``fired`` stays -1, so a gate on it never opens), and 1, a tripwire that has fired at 0 (a
    request whose rules found no row is stopped by it: ``tripwire``). ``growable=False`` (CUDA
    graphs, which replay on the tensors they captured) keeps ``capacity`` rows and refuses a rule
    beyond them."""

    def __init__(self, device: torch.device | str, capacity: int = 64, growable: bool = True) -> None:
        self.fired = torch.full((capacity + 2,), -1, dtype=torch.long, device=device)  # position it fired at; -1
        self.fired[1] = 0
        self.history = torch.zeros((capacity + 2, HISTORY), dtype=torch.bool, device=device)
        self.growable = growable
        self._free = list(range(capacity + 1, 1, -1))

    def tripwire(self, rule: ResolvedGuardrail) -> GuardState:
        """A state that has always fired: it stops a request whose own states found no row (fail closed)."""
        return GuardState(rule, self, 1)

    def allocate(self, rule: ResolvedGuardrail) -> GuardState:
        if not self._free:
            if not self.growable:
                raise GuardTableFull(f"every one of this worker's {len(self.fired) - 2} guardrail states is in use "
                                     "(finished requests hold theirs until fetched); try again shortly")
            self._grow()
        slot = self._free.pop()
        self.fired[slot] = -1
        self.history[slot] = False
        return GuardState(rule, self, slot)

    def release(self, states: list[GuardState]) -> None:
        free = set(self._free)
        for state in states:
            if state.slot in free:  # (a bug): freed twice, two requests would share its state later
                logger.error("guardrail slot %d released twice; kept once", state.slot)
                continue
            self._free.append(state.slot)
            free.add(state.slot)

    def _grow(self) -> None:
        n = len(self.fired)
        self.fired = torch.cat([self.fired, torch.full_like(self.fired, -1)])
        self.history = torch.cat([self.history, torch.zeros_like(self.history)])
        self._free = list(range(2 * n - 1, n - 1, -1))

    def observe(self, values: torch.Tensor, watched: list[Watched]) -> None:
        """One step at one site: ``values`` (rows, columns) holds every trigger's values, and each
        ``Watched`` says which rows and column are its rule's; all rules are updated at once, over
        one flat sequence of each rule's history bits then its rows (no padding to the longest)."""
        device, n = self.fired.device, sum(w.count for w in watched)
        # Every rule's numbers in one host tensor, copied at once without waiting for the device.
        host = torch.tensor([[w.state.slot, w.state.rule.tokens, w.state.rule.window, w.count, w.row, w.column,
                              w.first_position] for w in watched], dtype=torch.long)
        limits = torch.tensor([w.state.rule.threshold for w in watched], dtype=torch.float32)
        if device.type == "cuda":
            host, limits = host.pin_memory(), limits.pin_memory()
        host, threshold = host.to(device, non_blocking=True), limits.to(device, non_blocking=True)
        slots, tokens, window, count, row, column, first_position = host.unbind(1)
        rule = torch.repeat_interleave(torch.arange(len(watched), device=device), count, output_size=n)
        start = count.cumsum(0) - count  # each rule's first watched row, in watched-row order
        offset = torch.arange(n, device=device) - start[rule]  # a row's place among its rule's rows
        above = values[row[rule] + offset, column[rule]].float() > threshold[rule]
        # Rule b's bits sit at [block[b], block[b] + HISTORY + count[b]): its history, oldest first, then its rows.
        block = start + HISTORY * torch.arange(len(watched), device=device)
        history = block[:, None] + torch.arange(HISTORY, device=device)
        at = block[rule] + HISTORY + offset
        seq = torch.zeros(HISTORY * len(watched) + n, dtype=torch.bool, device=device)
        seq[history] = self.history[slots]
        seq[at] = above
        counts = F.pad(seq.long().cumsum(0), (1, 0))
        hits = counts[at + 1] - counts[at + 1 - window[rule]] >= tokens[rule]  # (a window never leaves its block)
        never = torch.iinfo(torch.long).max
        first = torch.full_like(slots, never).scatter_reduce(
            0, rule, torch.where(hits, first_position[rule] + offset, never), "amin")
        old = self.fired[slots]
        self.fired[slots] = torch.where(old >= 0, old, torch.where(first < never, first, -1))
        self.history[slots] = seq[history + count[:, None]]  # each block's last HISTORY bits


@dataclass
class GuardState:
    """One request's state of one rule (its row of the table), shared by the SAE sites it spans."""

    rule: ResolvedGuardrail
    table: GuardTable
    slot: int
    watched_to: int = 0  # positions below this were watched (a preempted request computes them again)

    @property
    def fired(self) -> torch.Tensor:
        """() int64: the sequence position where the rule fired; -1 before."""
        return self.table.fired[self.slot]

    def watch(self, column: int, row: int, first_position: int, scope: tuple[int, int]) -> Watched | None:
        """This step's watched rows of the request (``row``: its first row in the values; ``scope``:
        [a, b) among them), but those watched before; None when there are none."""
        a, b = max(scope[0], self.watched_to - first_position), scope[1]
        if b <= a:
            return None
        self.watched_to = first_position + b
        return Watched(self, column, row + a, b - a, first_position + a)

    def gate(self, positions: torch.Tensor) -> torch.Tensor:
        """(rows, 1) True where the rule has fired at or before the row's position."""
        fired = self.fired.to(positions.device)
        return ((fired >= 0) & (positions >= fired)).unsqueeze(1)


class Watched(NamedTuple):
    """A rule's rows in one step's trigger values."""

    state: GuardState
    column: int
    row: int
    count: int
    first_position: int


@dataclass(frozen=True)
class GuardPlan:
    """One rule's work at one SAE site for one request."""

    state: GuardState
    reads: bool  # its trigger is read here
    probe: LinearProbe | None  # the trigger probe, when the trigger is one
    mult: torch.Tensor | None  # steer: (m,) over the plan's features, 1 outside the rule's edit
    offset: torch.Tensor | None  # steer: (m,), 0 outside the rule's edit
    vector: torch.Tensor | None  # steer: (d_in,) summed steering vectors
    host: tuple[np.ndarray, np.ndarray] | None = None  # steer: ``mult``, ``offset`` on the host (for the fixed op)

    @property
    def steers(self) -> bool:
        return self.mult is not None or self.vector is not None


def aborting(states: list[GuardState]) -> torch.Tensor:
    """() bool: whether any of a request's abort rules has fired (they share one table)."""
    return states[0].table.fired[[s.slot for s in states]].ge(0).any()


@dataclass(frozen=True)
class Firing:
    """A rule that fired on a request: at which sequence position (prompt tokens count from 0)."""

    name: str
    action: str
    position: int
    server: bool


def firings(states: list[GuardState]) -> list[Firing]:
    """The rules that have fired (this reads the device: call it when answering, not per step)."""
    fired = states[0].table.fired[[s.slot for s in states]].tolist() if states else []
    return [Firing(s.rule.name, s.rule.action, p, s.rule.server) for s, p in zip(states, fired, strict=True) if p >= 0]


def _first(token: object) -> int | None:
    return token[0] if isinstance(token, list | tuple) and token else token if isinstance(token, int) else None


def eos_token(config: object) -> int | None:
    """A model config's end-of-sequence token (the first, when it declares several)."""
    return _first(getattr(config, "eos_token_id", None))




def release(states: list[GuardState]) -> None:
    """Free the table rows of rules no one will read again."""
    if states:
        states[0].table.release(states)
