import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_serve.sae.registry import registry_of
from sae_serve.steering.hook import apply_plan
from sae_serve.steering.plan import RequestRows, build_plan, prepare
from sae_serve.steering.spec import RequestSpec, ResolvedRequest, resolve
from tests.conftest import make_sae

D_IN, D_SAE = 16, 64


def registry(arch: str = "relu"):
    vec = torch.linspace(-1, 1, D_IN)
    return registry_of({"s": make_sae(arch, D_IN, D_SAE, seed=4)}, vectors={"v": ("s", vec)})


def request(reg, interventions=(), vectors=(), positions="all", readout=None) -> ResolvedRequest:
    body = {"steering": {"interventions": [{"sae": "s", **i} for i in interventions],
                         "vectors": list(vectors), "positions": positions}}
    if readout:
        body["return_features"] = {"sae": "s", **readout}
    return resolve(RequestSpec.model_validate(body), reg)


def reference(x: torch.Tensor, reg, req: ResolvedRequest, rows: RequestRows) -> torch.Tensor:
    """Encode, edit the features, decode, add back the error; all in float64."""
    sae = reg.saes["s"].sae
    t = {n: b.double() for n, b in sae.tensors().items()}
    x = x.double().clone()
    pos = rows.positions()
    keep = {"all": pos >= 0, "prompt": pos < rows.prompt_len, "generated": pos >= rows.prompt_len}[req.positions]
    scope = torch.arange(rows.start, rows.end)[keep]
    xs = x[scope]
    pre = (xs - t["b_dec"] if sae.cfg.apply_b_dec_to_input else xs) @ t["W_enc"] + t["b_enc"]
    a = sae.encode(xs.float()).double() if sae.cfg.architecture == "topk" else pre.clamp(min=0)
    edited = a.clone()
    for item in req.applied:
        f = item.feature
        edited[:, f] = {"clamp": item.value, "add": a[:, f] + item.value, "scale": a[:, f] * item.value}[item.mode]
    error = xs - (a @ t["W_dec"] + t["b_dec"])
    x[scope] = edited @ t["W_dec"] + t["b_dec"] + error + req.vectors.get("s", torch.zeros(D_IN)).double()
    return x


def plan_for(reg, reqs, layout):
    return build_plan([prepare("s", r, reg.saes["s"].sae) for r in reqs], layout)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_edit_equals_explicit_float64_computation(arch: str) -> None:
    reg = registry(arch)
    x = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(0)) * 2
    a = request(reg, [{"feature": 3, "mode": "clamp", "value": 5.0}, {"feature": 8, "mode": "scale", "value": 0},
                      {"feature": 9, "mode": "add", "value": -1.5}])
    b = request(reg, [{"feature": 3, "mode": "scale", "value": 2.0}], [{"name": "v", "coefficient": 3}],
                positions="generated")
    layout = [RequestRows(0, 4, 0, 4), RequestRows(5, 9, 2, 3)]  # row 4 and 9 belong to nobody
    out = apply_plan(x, reg.saes["s"].sae, plan_for(reg, [a, b], layout)).x
    expected = reference(reference(x, reg, a, layout[0]).float(), reg, b, layout[1])
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(out[[4, 9]], x[[4, 9]])
    assert torch.equal(out[5], x[5])  # position 2 < prompt_len 3: prompt, out of "generated" scope
    assert not torch.allclose(out[:4], x[:4])


def test_clamp_then_reencode_gives_the_target_for_orthonormal_features() -> None:
    """With an orthonormal dictionary and active features the edit is exact: re-encoding shows the
    clamped value. (An inactive ReLU feature's negative pre-activation stays in the error term.)"""
    sae = make_sae("relu", D_IN, D_IN, seed=1)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, dtype=torch.float64))
    sae.W_dec.copy_(q.T.float())
    sae.W_enc.copy_(q.float())
    sae.b_enc.fill_(100.0)  # every feature active
    reg = registry_of({"s": sae})
    req = request(reg, [{"feature": 2, "mode": "clamp", "value": 7.0}, {"feature": 5, "mode": "scale", "value": 0}])
    x = torch.randn(6, D_IN) * 3
    out = apply_plan(x, sae, plan_for(reg, [req], [RequestRows(0, 6, 0, 6)])).x
    again = sae.encode(out)
    torch.testing.assert_close(again[:, 2], torch.full((6,), 7.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(again[:, 5], torch.zeros(6), atol=1e-4, rtol=0)


def test_nobody_steering_costs_nothing_and_changes_nothing() -> None:
    reg = registry()
    x = torch.randn(5, D_IN)
    layout = [RequestRows(0, 3, 0, 3), RequestRows(3, 5, 0, 2)]
    assert plan_for(reg, [None, request(reg)], layout) == ()
    assert apply_plan(x, reg.saes["s"].sae, ()).x is x


def test_readout_only_leaves_x_bit_identical() -> None:
    reg = registry()
    x = torch.randn(5, D_IN)
    req = request(reg, readout={"top_k": 3})
    layout = [RequestRows(0, 2, 0, 2), RequestRows(2, 5, 4, 9)]
    result = apply_plan(x, reg.saes["s"].sae, plan_for(reg, [None, req], layout))
    assert torch.equal(result.x, x)
    acts = reg.saes["s"].sae.encode(x[2:5])
    got = result.readouts[1]
    assert got.positions.tolist() == [4, 5, 6]
    torch.testing.assert_close(got.values, acts.topk(3, dim=1).values)
    assert torch.equal(got.indices, acts.topk(3, dim=1).indices)
    assert list(result.readouts) == [1]


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_the_full_encode_runs_in_bounded_row_chunks_with_the_same_result(arch: str, monkeypatch) -> None:
    """A top-k readout (and a TopK SAE) encode every feature: in chunks of 3 rows here."""
    from sae_serve.steering import hook

    reg = registry(arch)
    x = torch.randn(10, D_IN)
    req = request(reg, [{"feature": 3, "mode": "clamp", "value": 5.0}], readout={"top_k": 4})
    plan = plan_for(reg, [req], [RequestRows(0, 10, 0, 10)])
    whole = apply_plan(x, reg.saes["s"].sae, plan)
    monkeypatch.setattr(hook, "FULL_ENCODE_ELEMENTS", 3 * D_SAE)
    chunked = apply_plan(x, reg.saes["s"].sae, plan)
    torch.testing.assert_close(chunked.x, whole.x)
    torch.testing.assert_close(chunked.readouts[0].values, whole.readouts[0].values)
    assert torch.equal(chunked.readouts[0].indices, whole.readouts[0].indices)


def test_feature_list_readout_shows_pre_edit_values() -> None:
    reg = registry()
    x = torch.randn(4, D_IN)
    req = request(reg, [{"feature": 3, "mode": "clamp", "value": 50.0}], readout={"features": [3, 10]})
    got = apply_plan(x, reg.saes["s"].sae, plan_for(reg, [req], [RequestRows(0, 4, 0, 4)])).readouts[0]
    acts = reg.saes["s"].sae.encode(x)
    torch.testing.assert_close(got.values, acts[:, [3, 10]])
    assert got.indices.tolist() == [[3, 10]] * 4


def test_subset_path_never_encodes_all_features() -> None:
    """relu/jumprelu plans without top_k compute only S (DESIGN.md cost model)."""
    sae = registry().saes["s"].sae
    reg = registry_of({"s": sae})
    req = request(reg, [{"feature": 3, "mode": "add", "value": 1.0}], readout={"features": [7]})
    plan = plan_for(reg, [req], [RequestRows(0, 4, 0, 4)])
    [seg] = plan
    assert seg.plan.subset is not None and seg.plan.features.tolist() == [3, 7]
    calls = []
    original = sae.encode
    sae.encode = lambda x: calls.append(x) or original(x)
    apply_plan(torch.randn(4, D_IN), sae, plan)
    del sae.encode
    assert calls == []


modes = st.sampled_from(["clamp", "add", "scale"])
interventions = st.lists(
    st.tuples(st.integers(0, D_SAE - 1), modes, st.floats(-10, 10, allow_nan=False)),
    max_size=4, unique_by=lambda t: t[0],
)
one_request = st.one_of(
    st.none(),
    st.tuples(interventions, st.sampled_from(["all", "prompt", "generated"]), st.floats(-3, 3), st.booleans()),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(one_request, min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_each_request_only_touches_its_own_rows(raw: list, seed: int) -> None:
    """Property: a request's rows are bit-identical whatever its neighbours ask."""
    reg = registry()
    sae = reg.saes["s"].sae
    reqs, layout, at = [], [], 0
    for i, r in enumerate(raw):
        n = 1 + i % 3
        layout.append(RequestRows(at, at + n, i, 1 + i % 2))
        at += n + 1  # one row of padding between requests
        if r is None:
            reqs.append(None)
            continue
        ivs, positions, coef, read = r
        reqs.append(request(
            reg, [{"feature": f, "mode": m, "value": v} for f, m, v in ivs],
            [{"name": "v", "coefficient": coef}] if coef else [], positions,
            {"top_k": 2} if read else None))
    x = torch.randn(at, D_IN, generator=torch.Generator().manual_seed(seed))
    together = apply_plan(x, sae, plan_for(reg, reqs, layout))
    for i, rows in enumerate(layout):
        alone_reqs = [r if j == i else None for j, r in enumerate(reqs)]
        alone = apply_plan(x, sae, plan_for(reg, alone_reqs, layout))
        assert torch.equal(together.x[rows.start:rows.end], alone.x[rows.start:rows.end])
        assert (i in together.readouts) == (i in alone.readouts)
        if i in alone.readouts:
            assert torch.equal(together.readouts[i].values, alone.readouts[i].values)
    padding = [r.end for r in layout]
    assert torch.equal(together.x[padding], x[padding])


def test_split_stream_edit_equals_the_joined_one() -> None:
    """vLLM keeps x = hidden + residual in two tensors; editing hidden in place is the same edit."""
    from sae_serve.steering.hook import apply_plan_split_

    reg = registry()
    sae = reg.saes["s"].sae
    hidden, residual = torch.randn(7, D_IN), torch.randn(7, D_IN)
    req = request(reg, [{"feature": 3, "mode": "clamp", "value": 4.0}], [{"name": "v", "coefficient": 2}],
                  readout={"top_k": 2})
    plan = plan_for(reg, [None, req], [RequestRows(0, 2, 0, 2), RequestRows(2, 6, 1, 3)])
    joined = apply_plan(hidden + residual, sae, plan)
    edited = hidden.clone()
    readouts = apply_plan_split_(edited, residual, sae, plan)
    torch.testing.assert_close(edited + residual, joined.x)
    assert torch.equal(edited[[0, 1, 6]], hidden[[0, 1, 6]])
    torch.testing.assert_close(readouts[1].values, joined.readouts[1].values)


def test_scope_is_a_contiguous_row_range() -> None:
    # A chunk of 6 rows at positions 8..13 of a request with a 10-token prompt.
    rows = RequestRows(start=20, end=26, first_position=8, prompt_len=10)
    assert rows.scope("all") == (0, 6)
    assert rows.scope("prompt") == (0, 2)
    assert rows.scope("generated") == (2, 6)
    decode = RequestRows(start=3, end=4, first_position=15, prompt_len=10)
    assert (decode.scope("prompt"), decode.scope("generated")) == ((0, 0), (0, 1))


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_readers_read_together_exactly_what_each_reads_alone(arch: str) -> None:
    """Requests that only read share one encode and one copy to the host; each gets, bit for bit,
    what it gets in a step of its own (a matmul's rounding depends on its shape: at this width a
    shared encode of the union would differ in the last bits), and the encode's values."""
    d_in, d_sae = 256, 1024
    reg = registry_of({"s": make_sae(arch, d_in, d_sae, seed=4)})
    sae = reg.saes["s"].sae
    rng = torch.Generator().manual_seed(3)
    wide = torch.randperm(d_sae, generator=rng)[:200].tolist()  # makes the union too wide to share
    reads = [{"top_k": 3}, {"features": [5, 1, 9]}, {"top_k": 6}, {"features": [9, 40, 700]},
             {"features": list(range(100, 170))}, {"features": wide}]
    reqs = [request(reg, readout=r) for r in reads] + [
        request(reg, [{"feature": 2, "mode": "clamp", "value": 4.0}], readout={"features": [2, 7]})]
    sizes = [3, 1, 4, 2, 5, 1, 2]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    layout = [RequestRows(a, a + n, 7, 3) for a, n in zip(starts, sizes, strict=True)]
    x = torch.randn(sum(sizes), d_in, generator=rng) * 2
    full = sae.encode(x)
    for together in (reqs, reqs[:5], reqs[1:2] + reqs[3:5]):  # with and without the wide reader
        got = apply_plan(x, sae, plan_for(reg, [r if r in together else None for r in reqs], layout)).readouts
        for i in (i for i, r in enumerate(reqs) if r in together):
            alone = apply_plan(x, sae, plan_for(reg, [r if j == i else None for j, r in enumerate(reqs)], layout))
            [(_, mine)] = alone.readouts.items()
            for a, b in zip(got[i], mine, strict=True):
                assert torch.equal(a, b), (i, reads[i] if i < len(reads) else "steers")
            rows = layout[i]
            torch.testing.assert_close(mine.values, full[rows.start:rows.end].gather(1, mine.indices),
                                       rtol=1e-5, atol=1e-5)
