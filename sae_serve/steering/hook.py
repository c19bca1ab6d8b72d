"""The residual-stream edit and the feature readout, for one SAE site and one forward step.

    x' = x + ((mult - 1) * a_S(x) + offset) W_dec[S] + vector

which is the paper's "clamp the feature, keep the error term": decoding the edited activations
and adding back the reconstruction error x - x_hat reduces to adding the change along the edited
features' decoder directions. Only the features in S are encoded unless the SAE is TopK or a
request reads its top-k features (DESIGN.md, "cost model"). Rows outside the plan are untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_serve.sae.model import SparseAutoencoder
from sae_serve.steering.plan import SaePlan


class FeatureActivations(NamedTuple):
    """One request's activations of one SAE over the positions processed in a step."""

    positions: torch.Tensor  # (n,) sequence positions
    indices: torch.Tensor  # (n, k) feature indices
    values: torch.Tensor  # (n, k) activations of the unedited residual stream


class HookResult(NamedTuple):
    x: torch.Tensor  # (tokens, d_in) the edited residual stream
    readouts: dict[int, FeatureActivations]  # by request index in the step


def _activations(x_rows: torch.Tensor, sae: SparseAutoencoder, plan: SaePlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n_rows, n_feat) activations of S, and (n_rows, d_sae) all activations when needed."""
    if plan.full_encode:
        full = sae.encode(x_rows)
        return full[:, plan.features], full
    return sae.encode_subset(x_rows, plan.features), None


def _readout(plan: SaePlan, acts: torch.Tensor, full: torch.Tensor | None, features: torch.Tensor) -> dict[int, FeatureActivations]:
    out = {}
    for r in plan.readouts:
        if r.top_k is not None:
            assert full is not None  # plan.full_encode is set whenever a readout asks for top_k
            values, indices = torch.topk(full[r.rows], k=min(r.top_k, full.shape[1]), dim=1)
        else:
            values = acts[r.rows][:, r.columns]
            indices = features[r.columns].expand(values.shape[0], -1)
        out[r.request] = FeatureActivations(r.positions, indices.cpu(), values.float().cpu())
    return out


def apply_plan(x: torch.Tensor, sae: SparseAutoencoder, plan: SaePlan | None) -> HookResult:
    """Edit and read ``x`` (tokens, d_in) as ``plan`` says; no plan, no work."""
    if plan is None:
        return HookResult(x, {})
    x_rows = x.index_select(0, plan.rows)
    acts, full = _activations(x_rows, sae, plan)
    if plan.mult is not None or plan.vector is not None:
        delta = torch.zeros(x_rows.shape, dtype=sae.dtype, device=x.device)
        if plan.mult is not None:
            delta = ((plan.mult - 1) * acts + plan.offset) @ sae.W_dec[plan.features]
        if plan.vector is not None:
            delta = delta + plan.vector
        x = x.index_add(0, plan.rows, delta.to(x.dtype))
    return HookResult(x, _readout(plan, acts, full, plan.features))


def splice(x: torch.Tensor, sae: SparseAutoencoder) -> torch.Tensor:
    """Replace x by the SAE's reconstruction (for evaluating Delta CE / loss recovered)."""
    return sae(x).to(x.dtype)
