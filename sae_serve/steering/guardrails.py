"""Guardrails in the forward pass: each rule's trigger is read on a request's tokens at its SAE's
site, and a steer rule's edit switches on from the token where it fired.

A rule fires at the first token (in its ``positions``) where at least ``tokens`` of the last
``window`` such tokens were above its threshold. The state a rule keeps per request is two small
tensors on the SAE's device (the position where it fired, and the last window - 1 above/below
bits), updated with tensor ops only, so no step waits for the host to decide. What the rule then
does:
- ``steer``: its edits apply to every token from the firing one on (the gate below), at the
  trigger's layer or later, so tokens before it are exactly the unsteered run's;
- ``abort``: the engine's sampler emits the stop token for the request from then on
  (``abort_rows``), so vLLM ends it there through its own stop check;
- ``flag``: nothing changes; the position is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_serve.sae.registry import LinearProbe
from sae_serve.steering.spec import ResolvedGuardrail


@dataclass
class GuardState:
    """One request's state of one rule, shared by the SAE sites the rule spans."""

    rule: ResolvedGuardrail
    fired: torch.Tensor  # () int64: the sequence position where the rule fired; -1 before
    history: torch.Tensor  # (window - 1,) bool: the latest watched tokens before this step's, oldest first
    watched_to: int = 0  # positions below this were watched (a preempted request computes them again)

    @classmethod
    def new(cls, rule: ResolvedGuardrail, device: torch.device) -> GuardState:
        return cls(rule, torch.full((), -1, dtype=torch.long, device=device),
                   torch.zeros(rule.window - 1, dtype=torch.bool, device=device))

    def observe(self, values: torch.Tensor, first_position: int, scope: tuple[int, int]) -> None:
        """Take one step's trigger values (rows of one request, positions from ``first_position``);
        only rows in ``scope`` [a, b) not watched before are."""
        a, b = max(scope[0], self.watched_to - first_position), scope[1]
        if b <= a:
            return
        self.watched_to = first_position + b
        seq = torch.cat([self.history, values[a:b].float() > self.rule.threshold])
        counts = torch.nn.functional.pad(seq.long().cumsum(0), (1, 0))
        window = self.rule.window
        hits = (counts[window:] - counts[: b - a]) >= self.rule.tokens  # per watched row: k of the last n
        position = torch.where(hits.any(), first_position + a + hits.int().argmax(), -1)
        self.fired = torch.where(self.fired >= 0, self.fired, position)
        self.history = seq[len(seq) - (window - 1):]

    def gate(self, positions: torch.Tensor) -> torch.Tensor:
        """(rows,) 1 where the rule has fired at or before the row's position, else 0."""
        fired = self.fired.to(positions.device)
        return ((fired >= 0) & (positions >= fired)).unsqueeze(1)


@dataclass(frozen=True)
class GuardPlan:
    """One rule's work at one SAE site for one request."""

    state: GuardState
    trigger_column: int | None  # the trigger feature's column among the plan's features (read here)
    probe: LinearProbe | None  # the trigger probe (read here)
    mult: torch.Tensor | None  # steer: (m,) over the plan's features, 1 outside the rule's edit
    offset: torch.Tensor | None  # steer: (m,), 0 outside the rule's edit
    vector: torch.Tensor | None  # steer: (d_in,) summed steering vectors

    @property
    def reads(self) -> bool:
        return self.trigger_column is not None or self.probe is not None

    @property
    def steers(self) -> bool:
        return self.mult is not None or self.vector is not None


def aborting(states: list[GuardState]) -> torch.Tensor:
    """() bool: whether any of a request's abort rules has fired."""
    return torch.stack([s.fired for s in states]).ge(0).any()


@dataclass(frozen=True)
class Firing:
    """A rule that fired on a request: at which sequence position (prompt tokens count from 0)."""

    name: str
    action: str
    position: int
    server: bool


def firings(states: list[GuardState]) -> list[Firing]:
    """The rules that have fired (this reads the device: call it when answering, not per step)."""
    fired = torch.stack([s.fired for s in states]).tolist() if states else []
    return [Firing(s.rule.name, s.rule.action, p, s.rule.server) for s, p in zip(states, fired, strict=True) if p >= 0]


def _first(token: object) -> int | None:
    return token[0] if isinstance(token, list | tuple) and token else token if isinstance(token, int) else None


def eos_token(config: object) -> int | None:
    """A model config's end-of-sequence token (the first, when it declares several)."""
    return _first(getattr(config, "eos_token_id", None))


def stop_token(config: object) -> tuple[int | None, bool]:
    """(the token the sampler emits for a request a guardrail aborts, whether it marks the abort),
    from a model config: a special token that is not end-of-sequence (BOS, else padding), so that
    vLLM reports it as the request's stop_reason and an abort is never mistaken for a natural end;
    else the EOS, unmarked (then an EOS right after a firing reads as an abort)."""
    eos = eos_token(config)
    for name in ("bos_token_id", "pad_token_id"):
        token = _first(getattr(config, name, None))
        if token is not None and token != eos:
            return token, True
    return eos, False
