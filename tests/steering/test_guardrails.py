"""A guardrail's trigger state across steps: k of the last n watched tokens, in scope, first firing kept."""

from __future__ import annotations

import pytest
import torch

from sae_serve.steering.guardrails import GuardState, GuardTable, aborting, firings
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
        watched = state.watch(0, 0, position, scope)
        if watched is not None:
            state.table.observe(torch.tensor(values)[:, None], [watched])
        position += n


def new(rule: ResolvedGuardrail) -> GuardState:
    return GuardTable("cpu").allocate(rule)


@pytest.mark.parametrize(("tokens", "window", "fired"), [(1, 1, 4), (2, 2, 7), (2, 3, 6), (3, 3, -1), (3, 5, 7)])
def test_k_of_the_last_n_tokens_across_steps(tokens: int, window: int, fired: int) -> None:
    # prompt of 3 tokens (values ignored: generated only), then one token per step
    state = new(rule(tokens, window))
    feed(state, [[5.0, 5.0, 5.0], [0.0], [2.0], [0.0], [2.0], [2.0], [0.0], [0.0]], prompt_len=3)
    assert int(state.fired) == fired


def test_scope_and_the_first_firing_is_kept() -> None:
    prompt = new(rule(positions="prompt"))
    feed(prompt, [[0.0, 3.0, 0.0], [9.0]], prompt_len=3)
    assert int(prompt.fired) == 1
    chunked = new(rule(tokens=2, window=2, positions="all"))
    feed(chunked, [[0.0, 2.0], [2.0, 0.0], [2.0], [2.0]], prompt_len=4)  # a prefill in two chunks
    assert int(chunked.fired) == 2  # positions 1 and 2 are above, across the chunk boundary


def test_gate_report_and_abort() -> None:
    table = GuardTable("cpu", capacity=1)  # (it grows)
    flag, abort = table.allocate(rule()), table.allocate(rule(action="abort"))
    assert not aborting([abort]) and firings([flag, abort]) == []
    feed(abort, [[0.0, 0.0], [0.0], [4.0]], prompt_len=2)
    assert aborting([flag, abort]) and [f.position for f in firings([flag, abort])] == [3]
    assert abort.gate(torch.arange(6)).squeeze(1).tolist() == [False, False, False, True, True, True]


def test_many_rules_of_many_requests_in_one_update_match_one_at_a_time() -> None:
    """The batched update (every rule read at a site, one step) equals updating each rule alone,
    over steps of mixed lengths (chunked prefill, then decode)."""
    gen = torch.Generator().manual_seed(0)
    rules = [rule(tokens=k, window=n, positions=pos) for k, n in ((1, 1), (2, 3), (3, 5), (1, 4))
             for pos in ("all", "generated")]
    together, alone = GuardTable("cpu"), [GuardTable("cpu") for _ in rules]
    batched, single = [together.allocate(r) for r in rules], [t.allocate(r) for t, r in zip(alone, rules, strict=True)]
    position, prompt = 0, 5
    for n in (3, 4, 1, 1, 1, 1, 1, 1):
        values = torch.rand(len(rules), n, generator=gen) * 2
        generated = max(0, min(n, position + n - prompt))
        watched = []
        for i, (a, b) in enumerate(zip(batched, single, strict=True)):
            scope = (0, n) if a.rule.positions == "all" else (n - generated, n)
            if (w := a.watch(0, i * n, position, scope)) is not None:
                watched.append(w)
            if (w := b.watch(0, 0, position, scope)) is not None:
                b.table.observe(values[i][:, None], [w])
        if watched:
            together.observe(values.reshape(-1, 1), watched)
        position += n
    assert [int(s.fired) for s in batched] == [int(s.fired) for s in single]
    assert len({int(s.fired) for s in batched}) > 2  # the rules fire at different tokens


def test_a_topk_trigger_is_encoded_in_bounded_chunks(monkeypatch) -> None:
    """A TopK SAE's trigger needs the full encode: in chunks of rows, as readouts do, with the same result."""
    from sae_serve.sae.registry import registry_of
    from sae_serve.steering import hook
    from sae_serve.steering.plan import RequestRows, build_plan, guard_states, prepare_all
    from sae_serve.steering.spec import RequestSpec, resolve
    from tests.conftest import make_sae

    sae = make_sae("topk", 16, 64, seed=2)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    feature = int(sae.encode(x).gt(0).sum(0).argmax())
    spec = RequestSpec.model_validate({"guardrails": [{"name": "t", "action": "flag", "when": {
        "sae": "s", "feature": feature, "above": {"value": 0.0}, "positions": "all", "tokens": 2, "window": 3}}]})

    def fired() -> list:
        plans = prepare_all(resolve(spec, registry_of({"s": sae})), {"s": sae})
        hook.apply_plan(x, sae, build_plan([plans["s"]], [RequestRows(0, 40, 0, 40)]))
        return firings(guard_states(plans))

    whole = fired()
    monkeypatch.setattr(hook, "FULL_ENCODE_ELEMENTS", 64 * 3)  # 3 rows a chunk
    encode, rows = sae.encode, []
    monkeypatch.setattr(sae, "encode", lambda chunk: rows.append(len(chunk)) or encode(chunk))
    assert fired() == whole and whole and max(rows) == 3
