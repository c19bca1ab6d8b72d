"""The residual-stream edit and the feature readout, for one SAE site and one forward step.

    x' = x + ((mult - 1) * a_S(x) + offset) W_dec[S] + vector

which is the paper's "clamp the feature, keep the error term": decoding the edited activations
and adding back the reconstruction error x - x_hat reduces to adding the change along the edited
features' decoder directions. Only the features in S are encoded unless the SAE is TopK or the
request reads its top-k features (DESIGN.md, "cost model"). Rows outside the plan are untouched.
Requests that only read never change the stream, so their readouts are computed together and
copied to the host at once (``read_together``), without a request's values depending on who reads
beside it: top-k readouts share one full encode in blocks of a fixed number of rows (a matmul's
rounding depends on how many rows it has, not on which of them a row is).
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import numpy as np
import torch

from sae_serve.sae.model import SparseAutoencoder
from sae_serve.steering.plan import RequestPlan, SaePlan, Segment


class FeatureActivations(NamedTuple):
    """One request's activations of one SAE over the positions processed in a step."""

    positions: torch.Tensor  # (n,) sequence positions
    indices: torch.Tensor  # (n, k) feature indices
    values: torch.Tensor  # (n, k) activations of the unedited residual stream


class HookResult(NamedTuple):
    x: torch.Tensor  # (tokens, d_in) the edited residual stream
    readouts: dict[int, FeatureActivations]  # by request index in the step


FULL_ENCODE_ELEMENTS = 2**24
"""Most (rows x d_sae) activations a full encode holds at once: one request's prefill on a large
dictionary (8k rows x 131k features) would otherwise take GBs that vLLM's memory profile never saw."""


def _encode_all(x_rows: torch.Tensor, sae: SparseAutoencoder, plan: RequestPlan
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Every feature, in row chunks: (the plan's features' activations, (top-k values, indices) or None)."""
    acts, values, indices = [], [], []
    for chunk in x_rows.split(max(1, FULL_ENCODE_ELEMENTS // sae.d_sae)):
        full = sae.encode(chunk)
        acts.append(full[:, plan.features])
        if plan.top_k is not None:
            top = torch.topk(full, k=min(plan.top_k, full.shape[1]), dim=1)
            values.append(top.values)
            indices.append(top.indices)
    return torch.cat(acts), (torch.cat(values), torch.cat(indices)) if plan.top_k is not None else None


def _run_segment(x_rows: torch.Tensor, sae: SparseAutoencoder, seg: Segment
                 ) -> tuple[torch.Tensor | None, int, FeatureActivations | None]:
    """(delta for the rows from the returned local offset on, or None; that offset; readout)."""
    plan = seg.plan
    if not (plan.steers or plan.reads or any(g.steers for g in plan.guards)):
        return None, 0, None  # only watched here (``observe_triggers`` did it)
    if plan.full_encode:
        acts, top = _encode_all(x_rows, sae, plan)
    else:
        acts, top = sae.encode_subset(x_rows, plan.subset), None
    delta, first = None, 0
    if plan.steers:
        first, last = seg.rows.scope(plan.positions)
        if last > first:
            delta = torch.zeros((last - first, sae.d_in), dtype=sae.dtype, device=x_rows.device)
            if plan.mult is not None:
                delta = ((plan.mult - 1) * acts[first:last] + plan.offset) @ plan.w_dec
            if plan.vector is not None:
                delta = delta + plan.vector
    if plan.guards:
        delta, first = _guardrails(x_rows, sae, seg, acts, delta, first)
    readout = None
    if plan.reads:
        if top is not None:
            values, indices = top
            readout = FeatureActivations(seg.rows.positions(), indices.cpu(), values.float().cpu())
        else:
            readout = read_features(seg, acts)
    return delta, first, readout


def _rows(hidden: torch.Tensor, residual: torch.Tensor | None, segs: list[Segment]) -> torch.Tensor:
    """The unedited stream (hidden + residual) at the rows of ``segs``, in their order (a copy)."""
    if all(a.rows.end == b.rows.start for a, b in pairwise(segs)):  # (a slice: no gather)
        rows = slice(segs[0].rows.start, segs[-1].rows.end)
        return hidden[rows].clone() if residual is None else hidden[rows] + residual[rows]
    index = torch.from_numpy(np.concatenate([np.arange(s.rows.start, s.rows.end) for s in segs]))
    index = index.to(hidden.device)
    return hidden[index] if residual is None else hidden[index] + residual[index]


def only_reads(plan: RequestPlan) -> bool:
    return plan.reads and not plan.steers and not any(g.steers for g in plan.guards)


READ_BLOCK = 32
"""Rows per encode when readers share one: every block has this many rows (the last padded)."""
COLUMN_BLOCK = 64
"""Features per encode of listed features, likewise."""


def _blocks(x: torch.Tensor) -> list[torch.Tensor]:
    pad = -len(x) % READ_BLOCK
    return list((torch.cat([x, x.new_zeros((pad, x.shape[1]))]) if pad else x).split(READ_BLOCK))


def read_together(hidden: torch.Tensor, residual: torch.Tensor | None, sae: SparseAutoencoder,
                  segs: list[Segment]) -> dict[int, FeatureActivations]:
    """The readouts of requests that only read (``only_reads``), by request, copied to the host at
    once: top-k readouts from one full encode of all their rows, listed features from one encode of
    their union (or each alone when the union is much wider than what they read). Both run in
    fixed-shape blocks (``_encode_listed``): a matmul's rounding depends on its shape, so a request
    reads the same values whoever reads beside it; the blocks also bound a full encode's memory."""
    ranked = [seg for seg in segs if seg.plan.top_k is not None]
    listed = [seg for seg in segs if seg.plan.top_k is None]
    return {**(_read_ranked(hidden, residual, sae, ranked) if ranked else {}),
            **(_read_listed(hidden, residual, sae, listed) if listed else {})}


def _read_ranked(hidden: torch.Tensor, residual: torch.Tensor | None, sae: SparseAutoencoder,
                 segs: list[Segment]) -> dict[int, FeatureActivations]:
    """Top-k readouts: one full encode, block by block; each row's top k at its request's k."""
    ks = sorted({min(seg.plan.top_k, sae.d_sae) for seg in segs})
    tops: dict[int, list[torch.return_types.topk]] = {k: [] for k in ks}
    for block in _blocks(_rows(hidden, residual, segs)):
        full = sae.encode(block)
        for k in ks:
            tops[k].append(torch.topk(full, k=k, dim=1))
    values = {k: torch.cat([t.values for t in got]).float() for k, got in tops.items()}
    indices = {k: torch.cat([t.indices for t in got]) for k, got in tops.items()}
    picked, start = [], 0
    for seg in segs:
        k, end = min(seg.plan.top_k, sae.d_sae), start + seg.rows.end - seg.rows.start
        picked.append((values[k][start:end], indices[k][start:end]))
        start = end
    host = zip(_to_host([v for v, _ in picked]), _to_host([i for _, i in picked]), strict=True)
    return {seg.request: FeatureActivations(seg.rows.positions(), i, v) for seg, (v, i) in zip(segs, host, strict=True)}


def _read_listed(hidden: torch.Tensor, residual: torch.Tensor | None, sae: SparseAutoencoder,
                 segs: list[Segment]) -> dict[int, FeatureActivations]:
    """Listed features: one encode of their union, or each alone when the union is much wider
    than what they read together."""
    union = sorted({int(f) for seg in segs for f in seg.plan.host.features})
    alone = sum((seg.rows.end - seg.rows.start) * len(seg.plan.host.features) for seg in segs)
    if sum(seg.rows.end - seg.rows.start for seg in segs) * len(union) <= 4 * alone:
        groups = [(segs, union)]
    else:
        groups = [([seg], sorted(int(f) for f in seg.plan.host.features)) for seg in segs]
    acts, order = [], []
    for group, features in groups:
        column = {f: j for j, f in enumerate(features)}
        encoded, start = _encode_listed(_rows(hidden, residual, group), sae, features), 0
        for seg in group:
            end = start + seg.rows.end - seg.rows.start
            acts.append(encoded[start:end, [column[int(f)] for f in seg.plan.host.features]].float())
            order.append(seg)
            start = end
    return {seg.request: FeatureActivations(seg.rows.positions(),
                                            torch.from_numpy(seg.plan.host.features).expand(len(values), -1), values)
            for seg, values in zip(order, _to_host(acts), strict=True)}


def _encode_listed(x: torch.Tensor, sae: SparseAutoencoder, features: list[int]) -> torch.Tensor:
    """(rows, len(features)) activations in READ_BLOCK x COLUMN_BLOCK blocks: an entry's rounding
    depends on the block's shape alone, not on which row or column of it, or what else is read."""
    if sae.cfg.architecture == "topk":  # every feature, always: the full encode's shape is fixed
        chosen = torch.tensor(features, device=x.device)
        return torch.cat([sae.encode(block)[:, chosen] for block in _blocks(x)])[: len(x)]
    padded = features + features[:1] * (-len(features) % COLUMN_BLOCK)
    parts = [sae.subset(torch.tensor(padded[c:c + COLUMN_BLOCK], device=x.device))
             for c in range(0, len(padded), COLUMN_BLOCK)]
    blocks = [torch.cat([sae.encode_subset(block, part) for part in parts], dim=1) for block in _blocks(x)]
    return torch.cat(blocks)[: len(x), : len(features)]


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors of one dtype copied to the host in one transfer."""
    flat = torch.cat([t.flatten() for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def observe_triggers(hidden: torch.Tensor, residual: torch.Tensor | None, sae: SparseAutoencoder,
                     plan: SaePlan) -> None:
    """Read every trigger of this site in the step, on the unedited stream (hidden + residual), and
    update their rules at once: one encode of the trigger features and one matmul per probe over
    the rows of the requests that have rules here, then one table update (``GuardTable.observe``)."""
    segs = [seg for seg in plan if any(g.reads for g in seg.plan.guards)]
    if not segs:
        return
    x = _rows(hidden, residual, segs)
    guards = [g for seg in segs for g in seg.plan.guards if g.reads]
    features = sorted({g.state.rule.feature for g in guards if g.probe is None})
    probes = {g.probe.name: g.probe for g in guards if g.probe is not None}
    columns = []
    if features:
        chosen = torch.tensor(features, device=hidden.device)
        if sae.cfg.architecture == "topk":  # the full encode, in bounded chunks as ``_encode_all``
            chunks = x.split(max(1, FULL_ENCODE_ELEMENTS // sae.d_sae))
            columns.append(torch.cat([sae.encode(chunk)[:, chosen] for chunk in chunks]).float())
        else:
            columns.append(sae.encode_subset(x, sae.subset(chosen)).float())
    columns += [probe(x).unsqueeze(1) for probe in probes.values()]
    column = {f: j for j, f in enumerate(features)} | {name: len(features) + j for j, name in enumerate(probes)}
    watched, row = [], 0
    for seg in segs:
        for g in (g for g in seg.plan.guards if g.reads):
            rule = g.state.rule
            w = g.state.watch(column[rule.feature if g.probe is None else rule.probe], row,
                              seg.rows.first_position, seg.rows.scope(rule.positions))
            watched += [w] if w is not None else []
        row += seg.rows.end - seg.rows.start
    for table in {id(w.state.table): w.state.table for w in watched}.values():
        table.observe(torch.cat(columns, dim=1), [w for w in watched if w.state.table is table])


def _guardrails(x_rows: torch.Tensor, sae: SparseAutoencoder, seg: Segment, acts: torch.Tensor,
                delta: torch.Tensor | None, first: int) -> tuple[torch.Tensor | None, int]:
    """Add the edits of the steer rules that have fired, on the rows from their firing token on
    (``observe_triggers`` read this step's triggers first): (delta over every row from offset 0, 0)."""
    plan, rows = seg.plan, seg.rows
    steering = [g for g in plan.guards if g.steers]
    if not steering:
        return delta, first
    full = torch.zeros((len(x_rows), sae.d_in), dtype=sae.dtype, device=x_rows.device)
    if delta is not None:
        full[first:first + len(delta)] += delta
    positions = rows.positions().to(x_rows.device)
    for guard in steering:
        change = ((guard.mult - 1) * acts + guard.offset) @ plan.w_dec if guard.mult is not None else 0
        full += guard.state.gate(positions) * (change + (guard.vector if guard.vector is not None else 0))
    return full, 0


def read_features(seg: Segment, acts: torch.Tensor) -> FeatureActivations:
    """The request's listed features from ``acts`` (rows, its features in plan order)."""
    plan = seg.plan
    values = acts[:, plan.read_columns]
    indices = plan.features[plan.read_columns].expand(values.shape[0], -1)
    return FeatureActivations(seg.rows.positions(), indices.cpu(), values.float().cpu())


def apply_plan(x: torch.Tensor, sae: SparseAutoencoder, plan: SaePlan) -> HookResult:
    """Edit and read ``x`` (tokens, d_in) as ``plan`` says; an empty plan does no work."""
    observe_triggers(x, None, sae, plan)
    together = [seg for seg in plan if only_reads(seg.plan)]
    readouts, out = read_together(x, None, sae, together) if together else {}, x
    for seg in plan:
        if only_reads(seg.plan):
            continue
        delta, first, readout = _run_segment(x[seg.rows.start : seg.rows.end], sae, seg)
        if delta is not None:
            out = x.clone() if out is x else out
            start = seg.rows.start + first
            out[start : start + len(delta)] += delta.to(x.dtype)
        if readout is not None:
            readouts[seg.request] = readout
    return HookResult(out, readouts)


def apply_plan_split_(hidden: torch.Tensor, residual: torch.Tensor, sae: SparseAutoencoder,
                      plan: SaePlan) -> dict[int, FeatureActivations]:
    """The same for a stream kept in two parts, x = hidden + residual (vLLM defers the residual
    add into the next layer's fused add-norm). Edits ``hidden`` in place; returns the readouts."""
    observe_triggers(hidden, residual, sae, plan)
    together = [seg for seg in plan if only_reads(seg.plan)]
    readouts = read_together(hidden, residual, sae, together) if together else {}
    for seg in plan:
        if only_reads(seg.plan):
            continue
        start, end = seg.rows.start, seg.rows.end
        delta, first, readout = _run_segment(hidden[start:end] + residual[start:end], sae, seg)
        if delta is not None:
            hidden[start + first : start + first + len(delta)] += delta.to(hidden.dtype)
        if readout is not None:
            readouts[seg.request] = readout
    return readouts


def splice(x: torch.Tensor, sae: SparseAutoencoder) -> torch.Tensor:
    """Replace x by the SAE's reconstruction (for evaluating Delta CE / loss recovered)."""
    return sae(x).to(x.dtype)
