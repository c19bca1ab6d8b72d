"""The residual-stream edit and the feature readout, for one SAE site and one forward step.

    x' = x + ((mult - 1) * a_S(x) + offset) W_dec[S] + vector

which is the paper's "clamp the feature, keep the error term": decoding the edited activations
and adding back the reconstruction error x - x_hat reduces to adding the change along the edited
features' decoder directions. Only the features in S are encoded unless the SAE is TopK or the
request reads its top-k features (DESIGN.md, "cost model"). Rows outside the plan are untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_serve.sae.model import SparseAutoencoder
from sae_serve.steering.plan import SaePlan, Segment


class FeatureActivations(NamedTuple):
    """One request's activations of one SAE over the positions processed in a step."""

    positions: torch.Tensor  # (n,) sequence positions
    indices: torch.Tensor  # (n, k) feature indices
    values: torch.Tensor  # (n, k) activations of the unedited residual stream


class HookResult(NamedTuple):
    x: torch.Tensor  # (tokens, d_in) the edited residual stream
    readouts: dict[int, FeatureActivations]  # by request index in the step


def _encode(x_rows: torch.Tensor, sae: SparseAutoencoder, seg: Segment) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, m) activations of the segment's features, and (n, d_sae) all of them when needed."""
    if seg.full_encode:
        full = sae.encode(x_rows)
        return full[:, seg.features], full
    return sae.encode_subset(x_rows, seg.features), None


def _delta(acts: torch.Tensor, sae: SparseAutoencoder, seg: Segment) -> torch.Tensor:
    """(e, d_in) change of the rows in the steering scope."""
    delta = torch.zeros((seg.edit_rows.numel(), sae.d_in), dtype=sae.dtype, device=acts.device)
    if seg.mult is not None:
        scoped = acts.index_select(0, seg.edit_rows)
        delta = ((seg.mult - 1) * scoped + seg.offset) @ sae.W_dec[seg.features]
    if seg.vector is not None:
        delta = delta + seg.vector
    return delta


def _readout(seg: Segment, acts: torch.Tensor, full: torch.Tensor | None) -> FeatureActivations:
    if seg.top_k is not None and full is not None:
        values, indices = torch.topk(full, k=min(seg.top_k, full.shape[1]), dim=1)
    else:
        values = acts[:, seg.read_columns]
        indices = seg.features[seg.read_columns].expand(values.shape[0], -1)
    return FeatureActivations(seg.positions, indices.cpu(), values.float().cpu())


def _run_segment(x_rows: torch.Tensor, sae: SparseAutoencoder, seg: Segment
                 ) -> tuple[torch.Tensor | None, FeatureActivations | None]:
    """(delta for ``seg.edit_rows`` or None, readout or None) for one request's rows."""
    acts, full = _encode(x_rows, sae, seg)
    delta = _delta(acts, sae, seg) if seg.edits else None
    return delta, (_readout(seg, acts, full) if seg.reads else None)


def apply_plan(x: torch.Tensor, sae: SparseAutoencoder, plan: SaePlan) -> HookResult:
    """Edit and read ``x`` (tokens, d_in) as ``plan`` says; an empty plan does no work."""
    readouts = {}
    for seg in plan:
        delta, readout = _run_segment(x.index_select(0, seg.rows), sae, seg)
        if delta is not None:
            x = x.index_add(0, seg.rows[seg.edit_rows], delta.to(x.dtype))
        if readout is not None:
            readouts[seg.request] = readout
    return HookResult(x, readouts)


def apply_plan_split_(hidden: torch.Tensor, residual: torch.Tensor, sae: SparseAutoencoder,
                      plan: SaePlan) -> dict[int, FeatureActivations]:
    """The same for a stream kept in two parts, x = hidden + residual (vLLM defers the residual
    add into the next layer's fused add-norm). Edits ``hidden`` in place; returns the readouts."""
    readouts = {}
    for seg in plan:
        x_rows = hidden.index_select(0, seg.rows) + residual.index_select(0, seg.rows)
        delta, readout = _run_segment(x_rows, sae, seg)
        if delta is not None:
            hidden.index_add_(0, seg.rows[seg.edit_rows], delta.to(hidden.dtype))
        if readout is not None:
            readouts[seg.request] = readout
    return readouts


def splice(x: torch.Tensor, sae: SparseAutoencoder) -> torch.Tensor:
    """Replace x by the SAE's reconstruction (for evaluating Delta CE / loss recovered)."""
    return sae(x).to(x.dtype)
