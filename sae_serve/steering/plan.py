"""Turn one forward step's requests into dense tensors for one SAE site.

An engine flattens its batch to ``(tokens, d_in)`` rows and describes which rows belong to which
request (``RequestRows``). ``build_plan`` gathers the rows of the requests that steer or read
this SAE, the union feature set S, and per-row affine targets ``t = mult * a + offset`` over S.
A step in which nobody steers or reads this SAE gives ``None``: the hook then does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sae_serve.steering.spec import Positions, ResolvedRequest


@dataclass(frozen=True)
class RequestRows:
    """Where one request's tokens sit in the step's flattened activations."""

    start: int
    """First row (inclusive)."""
    end: int
    """Last row (exclusive)."""
    first_position: int
    """Sequence position of row ``start`` (tokens already in the KV cache come before it)."""
    prompt_len: int
    """Positions below this are prompt tokens, the rest are generated."""

    def positions(self) -> torch.Tensor:
        return torch.arange(self.first_position, self.first_position + self.end - self.start)

    def in_scope(self, scope: Positions) -> torch.Tensor:
        """(rows,) bool: which of this request's rows the steering edits."""
        pos = self.positions()
        if scope == "prompt":
            return pos < self.prompt_len
        if scope == "generated":
            return pos >= self.prompt_len
        return torch.ones_like(pos, dtype=torch.bool)


@dataclass(frozen=True)
class Readout:
    """One request's feature readout within a plan."""

    request: int
    """Index of the request in the step's request list."""
    rows: slice
    """Its rows within ``SaePlan.rows``."""
    positions: torch.Tensor  # (n,) sequence positions of those rows
    top_k: int | None
    columns: torch.Tensor | None  # (m,) columns of SaePlan.features for a feature-list readout


@dataclass(frozen=True)
class SaePlan:
    """Everything the hook needs for one SAE in one forward step."""

    rows: torch.Tensor  # (n_rows,) long: rows of x that are encoded
    features: torch.Tensor  # (n_feat,) long: S, the edited and read features
    full_encode: bool  # encode all d_sae features (topk SAE or a top_k readout)
    mult: torch.Tensor | None  # (n_rows, n_feat); None when no feature is edited
    offset: torch.Tensor | None  # (n_rows, n_feat)
    vector: torch.Tensor | None  # (n_rows, d_in) summed steering vectors
    readouts: tuple[Readout, ...]


def _feature_set(sae: str, requests: Sequence[ResolvedRequest]) -> list[int]:
    features: set[int] = set()
    for req in requests:
        if sae in req.edits:
            features.update(req.edits[sae].features)
        if req.readout and req.readout.sae == sae and req.readout.features:
            features.update(req.readout.features)
    return sorted(features)


def build_plan(
    sae: str,
    requests: Sequence[ResolvedRequest | None],
    layout: Sequence[RequestRows],
    *,
    d_in: int,
    topk_sae: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SaePlan | None:
    """The plan for SAE ``sae``; ``requests[i]`` owns rows ``layout[i]`` (None: plain request)."""
    active = [
        (i, req, rows) for i, (req, rows) in enumerate(zip(requests, layout, strict=True))
        if req is not None and sae in req.sae_names() and rows.end > rows.start
    ]
    if not active:
        return None
    features = _feature_set(sae, [req for _, req, _ in active])
    column = {f: j for j, f in enumerate(features)}
    n_rows = sum(rows.end - rows.start for _, _, rows in active)
    edits = any(sae in req.edits for _, req, _ in active)
    mult = torch.ones(n_rows, len(features), dtype=dtype) if edits else None
    offset = torch.zeros(n_rows, len(features), dtype=dtype) if edits else None
    vectors = any(sae in req.vectors for _, req, _ in active)
    vector = torch.zeros(n_rows, d_in, dtype=dtype) if vectors else None
    row_ids, readouts, at = [], [], 0
    for i, req, rows in active:
        span = slice(at, at + rows.end - rows.start)
        row_ids.append(torch.arange(rows.start, rows.end))
        scope = torch.nonzero(rows.in_scope(req.positions)).squeeze(1) + at
        if sae in req.edits:
            edit = req.edits[sae]
            cols = torch.tensor([column[f] for f in edit.features])
            mult[scope[:, None], cols] = torch.tensor(edit.mult, dtype=dtype)
            offset[scope[:, None], cols] = torch.tensor(edit.offset, dtype=dtype)
        if sae in req.vectors:
            vector[scope] = req.vectors[sae].to(dtype=dtype, device="cpu")
        if req.readout and req.readout.sae == sae:
            cols = None if req.readout.features is None else torch.tensor(
                [column[f] for f in req.readout.features]
            )
            readouts.append(Readout(i, span, rows.positions(), req.readout.top_k, cols))
        at = span.stop
    to = {"device": device}
    return SaePlan(
        rows=torch.cat(row_ids).to(**to),
        features=torch.tensor(features, dtype=torch.long, device=device),
        full_encode=topk_sae or any(r.top_k is not None for r in readouts),
        mult=None if mult is None else mult.to(**to),
        offset=None if offset is None else offset.to(**to),
        vector=None if vector is None else vector.to(**to),
        readouts=tuple(readouts),
    )
