"""Turn one forward step's requests into tensors for one SAE site.

An engine flattens its batch to ``(tokens, d_in)`` rows and says which rows belong to which
request (``RequestRows``). ``build_plan`` makes one ``Segment`` per request that steers or reads
this SAE: its rows, its own feature set S, and its affine targets ``t = mult * a + offset``.
Each segment is computed on its own, so the arithmetic a request sees (matrix shapes, summation
order) depends on that request alone: its result is bit-identical whatever its neighbours ask.
A step in which nobody steers or reads this SAE gives an empty plan: the hook does nothing.
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
class Segment:
    """One request's work on one SAE in one forward step."""

    request: int
    """Index of the request in the step's request list."""
    rows: torch.Tensor  # (n,) long: rows of x
    positions: torch.Tensor  # (n,) sequence positions of those rows
    features: torch.Tensor  # (m,) long: the features this request edits or reads
    full_encode: bool  # encode all d_sae features (topk SAE, or a top_k readout)
    edit_rows: torch.Tensor | None  # (e,) long: indices into ``rows`` in the steering scope
    mult: torch.Tensor | None  # (m,) per-feature multiplier of a (1 for read-only features)
    offset: torch.Tensor | None  # (m,) per-feature offset (0 for read-only features)
    vector: torch.Tensor | None  # (d_in,) summed steering vectors
    top_k: int | None  # readout: the k most active features per row
    read_columns: torch.Tensor | None  # readout: columns of ``features`` to report

    @property
    def edits(self) -> bool:
        return self.edit_rows is not None and self.edit_rows.numel() > 0

    @property
    def reads(self) -> bool:
        return self.top_k is not None or self.read_columns is not None


SaePlan = tuple[Segment, ...]


def _segment(
    sae: str, index: int, req: ResolvedRequest, rows: RequestRows, topk_sae: bool,
    device: torch.device | str, dtype: torch.dtype,
) -> Segment:
    edit = req.edits.get(sae)
    readout = req.readout if req.readout and req.readout.sae == sae else None
    read_list = readout.features if readout else None
    features = list(edit.features) if edit else []
    features += [f for f in read_list or () if f not in features]
    column = {f: j for j, f in enumerate(features)}
    steers = edit is not None or sae in req.vectors
    mult = offset = None
    if edit is not None:
        mult = torch.ones(len(features), dtype=dtype)
        offset = torch.zeros(len(features), dtype=dtype)
        mult[: len(edit.features)] = torch.tensor(edit.mult, dtype=dtype)
        offset[: len(edit.features)] = torch.tensor(edit.offset, dtype=dtype)
    to = {"device": device}
    return Segment(
        request=index,
        rows=torch.arange(rows.start, rows.end, **to),
        positions=rows.positions(),
        features=torch.tensor(features, dtype=torch.long, **to),
        full_encode=topk_sae or (readout is not None and readout.top_k is not None),
        edit_rows=torch.nonzero(rows.in_scope(req.positions)).squeeze(1).to(**to) if steers else None,
        mult=None if mult is None else mult.to(**to),
        offset=None if offset is None else offset.to(**to),
        vector=req.vectors[sae].to(dtype=dtype, **to) if sae in req.vectors else None,
        top_k=readout.top_k if readout else None,
        read_columns=torch.tensor([column[f] for f in read_list], **to) if read_list else None,
    )


def build_plan(
    sae: str,
    requests: Sequence[ResolvedRequest | None],
    layout: Sequence[RequestRows],
    *,
    topk_sae: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SaePlan:
    """The plan for SAE ``sae``; ``requests[i]`` owns rows ``layout[i]`` (None: plain request)."""
    return tuple(
        _segment(sae, i, req, rows, topk_sae, device, dtype)
        for i, (req, rows) in enumerate(zip(requests, layout, strict=True))
        if req is not None and sae in req.sae_names() and rows.end > rows.start
    )
