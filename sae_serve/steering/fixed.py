"""The steering op with fixed shapes, for CUDA graphs.

A captured graph replays the same kernels on the same tensors, so the op reads only persistent
tables that the host fills before each step (``FixedTables``), and no shape depends on what the
requests ask. Per token row t, up to ``capacity.slots`` features (those its request edits or reads)
sit in that row's own slots: ``index[t, s]``, ``mult[t, s]``, ``offset[t, s]``. Unused slots hold
feature 0 with mult 1 and offset 0, which adds exactly nothing. A request's summed steering vector
is one row of a per-step vector bank (row 0 is zeros) that its token rows point to.

The op gathers each row's own encoder rows and multiplies per row, (1, d_in) x (d_in, slots)
batched over rows, and decodes each row as a bag of its own decoder rows weighted by its
coefficients (``embedding_bag``, which never materialises the gathered rows): a row's arithmetic
never depends on its neighbours, so isolation stays bit-exact, as with ``hook.apply_plan``.
Same math as ``hook.py``: x' = x + ((mult - 1) * a_S(x) + offset) W_dec[S] + vector.

What needs variable shapes stays on the segment path (``hook.py``): top-k readouts and TopK SAEs
(both need the full encode), and requests that name more features than there are slots, which
``FixedTables.fill`` refuses with ``CapacityError`` rather than steer them partly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sae_serve.errors import SaeServeError, SpecError
from sae_serve.sae.model import FeatureSubset, SparseAutoencoder
from sae_serve.steering.hook import FeatureActivations, read_features
from sae_serve.steering.plan import RequestPlan, SaePlan, Segment
from sae_serve.steering.spec import ResolvedRequest


class CapacityError(SaeServeError):
    """A step's plan does not fit the fixed tables."""


@dataclass(frozen=True)
class Capacity:
    tokens: int
    """Rows per step (vLLM's max_num_batched_tokens)."""
    slots: int = 16
    """Features one request may edit and read on one SAE."""
    requests: int = 256
    """Requests with a steering vector in one step (vLLM's max_num_seqs)."""


def fits(plan: RequestPlan, capacity: Capacity) -> bool:
    """Whether the fixed op can run ``plan`` (else it takes the segment path)."""
    return not plan.full_encode and not plan.guards and len(plan.host.features) <= capacity.slots


def check_runnable(request: ResolvedRequest, slots: int) -> None:
    """Refuse, naming the field, a request that the fixed op alone (CUDA graphs) could run only
    partly: it is never steered silently less than it asked."""
    readout = request.readout
    if readout is not None and readout.top_k is not None:
        raise SpecError("return_features.top_k", "this server replays CUDA graphs, which cannot rank every "
                        "feature per token; name the features to read instead")
    for sae in request.sae_names():
        edited = request.edits[sae].features if sae in request.edits else ()
        read = readout.features if readout is not None and readout.sae == sae and readout.features else ()
        named = len(set(edited) | set(read))  # edits and reads share the slots, as in the plan's features
        if named > slots:
            raise SpecError("steering.interventions", f"{named} features on SAE {sae!r} exceed this server's "
                            f"capacity of {slots} per request (config op.slots)")


class FixedTables:
    """The persistent tables of one SAE site, on the SAE's device."""

    def __init__(self, sae: SparseAutoencoder, capacity: Capacity) -> None:
        if sae.cfg.architecture == "topk":
            raise SaeServeError("the fixed-shape op encodes feature subsets: a topk SAE needs the segment path")
        t, s, device, dtype = capacity.tokens, capacity.slots, sae.W_dec.device, sae.dtype
        self.capacity = capacity
        self.index = torch.zeros(t, s, dtype=torch.long, device=device)
        self.mult = torch.ones(t, s, dtype=dtype, device=device)
        self.offset = torch.zeros(t, s, dtype=dtype, device=device)
        self.vector_row = torch.zeros(t, dtype=torch.long, device=device)
        self.vectors = torch.zeros(capacity.requests + 1, sae.d_in, dtype=dtype, device=device)
        self.activations = torch.zeros(t, s, dtype=dtype, device=device)  # written by the op: readouts
        self._filled = 0  # rows written by the last fill, reset by the next

    def fill(self, plan: SaePlan) -> None:
        """Write one step's segments into the tables; rows of other requests become no-ops."""
        cap, rows = self.capacity, max((seg.rows.end for seg in plan), default=0)
        if rows > cap.tokens:
            raise CapacityError(f"a step of {rows} tokens exceeds the fixed op's capacity of {cap.tokens}")
        index, mult = np.zeros((rows, cap.slots), dtype=np.int64), np.ones((rows, cap.slots), dtype=np.float32)
        offset, vector_row = np.zeros((rows, cap.slots), dtype=np.float32), np.zeros(rows, dtype=np.int64)
        vectors = []
        for seg in plan:
            p, start, end = seg.plan, seg.rows.start, seg.rows.end
            if not fits(p, cap):
                raise CapacityError(f"request {seg.request} names {len(p.host.features)} features "
                                    f"(capacity {cap.slots} per request) or asks for a top-k readout")
            m = len(p.host.features)
            index[start:end, :m] = p.host.features
            first, last = seg.rows.scope(p.positions)
            if p.mult is not None:
                mult[start + first:start + last, :m] = p.host.mult
                offset[start + first:start + last, :m] = p.host.offset
            if p.vector is not None:
                if len(vectors) == cap.requests:
                    raise CapacityError(f"more than {cap.requests} requests with steering vectors in one step")
                vectors.append(p.vector)
                vector_row[start + first:start + last] = len(vectors)
        self._reset(rows)
        self.index[:rows].copy_(torch.from_numpy(index), non_blocking=True)
        self.mult[:rows].copy_(torch.from_numpy(mult), non_blocking=True)
        self.offset[:rows].copy_(torch.from_numpy(offset), non_blocking=True)
        self.vector_row[:rows].copy_(torch.from_numpy(vector_row), non_blocking=True)
        if vectors:
            self.vectors[1:len(vectors) + 1] = torch.stack(vectors)
        self._filled = rows

    @property
    def filled(self) -> bool:
        """Whether the last fill wrote any request (else the op would add only zeros)."""
        return self._filled > 0

    def _reset(self, rows: int) -> None:
        """Make the rows the previous step wrote beyond ``rows`` no-ops again."""
        if self._filled > rows:
            self.index[rows:self._filled] = 0
            self.mult[rows:self._filled] = 1
            self.offset[rows:self._filled] = 0
            self.vector_row[rows:self._filled] = 0


def steer_fixed_(hidden: torch.Tensor, residual: torch.Tensor, sae: SparseAutoencoder, tables: FixedTables) -> None:
    """Edit ``hidden`` (tokens, d_in) in place from the tables; the stream is hidden + residual.
    Every shape is (tokens, ...) with tokens the padded batch: graph-capturable."""
    n = hidden.shape[0]
    index = tables.index[:n]
    x = sae._encoder_input(hidden + residual)
    pre = torch.bmm(sae.encoder_rows[index], x.unsqueeze(-1)).squeeze(-1) + sae.b_enc[index]
    threshold = getattr(sae, "threshold", None)
    acts = sae._activate_subset(pre, FeatureSubset(index, None, None,  # type: ignore[arg-type]
                                                    None if threshold is None else threshold[index]))
    tables.activations[:n].copy_(acts)
    coef = (tables.mult[:n] - 1) * acts + tables.offset[:n]
    # Each row's weighted sum of its own decoder rows, without gathering them first (a bag per row).
    delta = F.embedding_bag(index, sae.W_dec, per_sample_weights=coef, mode="sum")
    delta = delta + tables.vectors[tables.vector_row[:n]]
    hidden += delta.to(hidden.dtype)


def fixed_readout(tables: FixedTables, seg: Segment) -> FeatureActivations:
    """A reading request's activations, from the slots the op wrote (slot order is plan order)."""
    return read_features(seg, tables.activations[seg.rows.start:seg.rows.end])
