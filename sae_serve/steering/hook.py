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


def apply_plan(x: torch.Tensor, sae: SparseAutoencoder, plan: SaePlan) -> HookResult:
    """Edit and read ``x`` (tokens, d_in) as ``plan`` says; an empty plan does no work."""
    readouts = {}
    for seg in plan:
        x_rows = x.index_select(0, seg.rows)
        acts, full = _encode(x_rows, sae, seg)
        if seg.edits:
            x = x.index_add(0, seg.rows[seg.edit_rows], _delta(acts, sae, seg).to(x.dtype))
        if seg.reads:
            readouts[seg.request] = _readout(seg, acts, full)
    return HookResult(x, readouts)


def splice(x: torch.Tensor, sae: SparseAutoencoder) -> torch.Tensor:
    """Replace x by the SAE's reconstruction (for evaluating Delta CE / loss recovered)."""
    return sae(x).to(x.dtype)
