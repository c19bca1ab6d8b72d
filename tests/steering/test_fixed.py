"""The fixed-shape (CUDA-graph-safe) op against the segment hook: same edit, same readouts, exact
isolation, and clear refusals over capacity. (CPU tensors: the graph capture itself needs a GPU.)"""

import pytest
import torch

from sae_serve.errors import SaeServeError
from sae_serve.steering.fixed import Capacity, CapacityError, FixedTables, steer_fixed_
from sae_serve.steering.hook import apply_plan_split_
from sae_serve.steering.plan import RequestRows
from tests.conftest import make_sae
from tests.steering.test_hook import D_IN, plan_for, registry, request

LAYOUT = [RequestRows(0, 4, 0, 4), RequestRows(4, 5, 7, 3), RequestRows(5, 9, 2, 3), RequestRows(9, 12, 0, 9)]


def _requests(reg):
    return [
        request(reg, [{"feature": 3, "mode": "clamp", "value": 5.0}, {"feature": 8, "mode": "scale", "value": 0}],
                readout={"features": [3, 11]}),
        None,  # a plain request between steered ones
        request(reg, [{"feature": 3, "mode": "scale", "value": 2.0}], [{"name": "v", "coefficient": 3}],
                positions="generated"),
        request(reg, [{"feature": 9, "mode": "add", "value": -1.5}], positions="prompt"),
    ]


def _stream(rows: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, D_IN, generator=g) * 2, torch.randn(rows, D_IN, generator=g)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_fixed_op_equals_the_segment_hook(arch: str) -> None:
    reg = registry(arch)
    sae = reg.saes["s"].sae
    plan = plan_for(reg, _requests(reg), LAYOUT)
    hidden, residual = _stream()
    want = hidden.clone()
    readouts = apply_plan_split_(want, residual, sae, plan)
    tables = FixedTables(sae, Capacity(tokens=16, slots=4, requests=4))
    tables.fill(plan)
    got = hidden.clone()
    steer_fixed_(got, residual, sae, tables)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[4], hidden[4]) and torch.equal(got[12], hidden[12])  # plain row, padding row
    columns = plan[0].plan.read_columns  # the request's slots hold its features in plan order
    torch.testing.assert_close(tables.activations[0:4, columns].float(), readouts[0].values, rtol=1e-5, atol=1e-5)


def test_a_rows_result_is_bit_identical_whatever_its_neighbours_do() -> None:
    reg = registry("jumprelu")
    sae = reg.saes["s"].sae
    tables = FixedTables(sae, Capacity(tokens=16, slots=4, requests=4))
    hidden, residual = _stream()
    mine = _requests(reg)[0]
    results = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        others = [request(reg, [{"feature": int(torch.randint(0, 64, (1,), generator=g)), "mode": "add",
                                 "value": float(torch.rand(1, generator=g))}]) if seed else None for _ in range(3)]
        tables.fill(plan_for(reg, [mine, *others], LAYOUT))
        out = hidden.clone()
        steer_fixed_(out, residual, sae, tables)
        results.append(out[0:4])
    assert all(torch.equal(r, results[0]) for r in results)


def test_a_smaller_step_resets_the_rows_of_the_previous_one() -> None:
    reg = registry()
    sae = reg.saes["s"].sae
    tables = FixedTables(sae, Capacity(tokens=16, slots=4, requests=4))
    tables.fill(plan_for(reg, _requests(reg), LAYOUT))
    tables.fill(plan_for(reg, [_requests(reg)[0]], LAYOUT[:1]))
    hidden, residual = _stream()
    out = hidden.clone()
    steer_fixed_(out, residual, sae, tables)
    assert torch.equal(out[4:], hidden[4:])  # the earlier step's requests no longer steer


def test_over_capacity_is_refused_not_partly_steered() -> None:
    reg = registry()
    sae = reg.saes["s"].sae
    many = request(reg, [{"feature": f, "mode": "add", "value": 1.0} for f in range(5)])
    with pytest.raises(CapacityError, match="5 features .* exceed op.slots=4"):
        FixedTables(sae, Capacity(tokens=16, slots=4)).fill(plan_for(reg, [many], LAYOUT[:1]))
    top = request(reg, readout={"top_k": 3})
    with pytest.raises(CapacityError, match="top-k"):
        FixedTables(sae, Capacity(tokens=16, slots=4)).fill(plan_for(reg, [top], LAYOUT[:1]))
    with pytest.raises(CapacityError, match="exceeds"):
        FixedTables(sae, Capacity(tokens=8, slots=4)).fill(plan_for(reg, _requests(reg), LAYOUT))
    with pytest.raises(SaeServeError, match="topk SAE"):
        FixedTables(make_sae("topk", D_IN, 64), Capacity(tokens=8))
