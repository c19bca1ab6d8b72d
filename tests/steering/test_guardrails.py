"""A guardrail's trigger state across steps: k of the last n watched tokens, in scope, first firing kept."""

from __future__ import annotations

import pytest
import torch

from sae_serve.steering.guardrails import GuardState, aborting, firings
from sae_serve.steering.spec import ResolvedGuardrail


def rule(tokens: int = 1, window: int = 1, positions: str = "generated", action: str = "flag") -> ResolvedGuardrail:
    return ResolvedGuardrail("r", action, "s", 0, None, 1.0, tokens, window, positions, {}, {}, (), False)


def feed(state: GuardState, steps: list[list[float]], prompt_len: int) -> None:
    """Each step's trigger values of one request, rows from the next position on."""
    position = 0
    for values in steps:
        n = len(values)
        generated = max(0, min(n, position + n - prompt_len))
        scope = {"all": (0, n), "prompt": (0, n - generated), "generated": (n - generated, n)}[state.rule.positions]
        state.observe(torch.tensor(values), position, scope)
        position += n


@pytest.mark.parametrize(("tokens", "window", "fired"), [(1, 1, 4), (2, 2, 7), (2, 3, 6), (3, 3, -1), (3, 5, 7)])
def test_k_of_the_last_n_tokens_across_steps(tokens: int, window: int, fired: int) -> None:
    # prompt of 3 tokens (values ignored: generated only), then one token per step
    state = GuardState.new(rule(tokens, window), torch.device("cpu"))
    feed(state, [[5.0, 5.0, 5.0], [0.0], [2.0], [0.0], [2.0], [2.0], [0.0], [0.0]], prompt_len=3)
    assert int(state.fired) == fired


def test_scope_and_the_first_firing_is_kept() -> None:
    prompt = GuardState.new(rule(positions="prompt"), torch.device("cpu"))
    feed(prompt, [[0.0, 3.0, 0.0], [9.0]], prompt_len=3)
    assert int(prompt.fired) == 1
    chunked = GuardState.new(rule(tokens=2, window=2, positions="all"), torch.device("cpu"))
    feed(chunked, [[0.0, 2.0], [2.0, 0.0], [2.0], [2.0]], prompt_len=4)  # a prefill in two chunks
    assert int(chunked.fired) == 2  # positions 1 and 2 are above, across the chunk boundary


def test_gate_report_and_abort() -> None:
    flag, abort = GuardState.new(rule(), torch.device("cpu")), GuardState.new(rule(action="abort"), torch.device("cpu"))
    assert not aborting([abort]) and firings([flag, abort]) == []
    feed(abort, [[0.0, 0.0], [0.0], [4.0]], prompt_len=2)
    assert aborting([flag, abort]) and [f.position for f in firings([flag, abort])] == [3]
    assert abort.gate(torch.arange(6)).squeeze(1).tolist() == [False, False, False, True, True, True]
