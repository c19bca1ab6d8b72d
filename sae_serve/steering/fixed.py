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

Guardrails run here too (``Capacity.lanes`` > 0), with the rule state in the engine's
``GuardTable`` and no decision on the host. Each row has ``lanes`` trigger lanes: the rule's table
row, the column of its value (one of the row's slots, where a feature trigger sits, or a probe of
this site), its threshold and window, whether the row is watched, and how many of the rule's rows
come before it in the step. A lane counts its rule's last ``window`` watched bits from the step's rows
and the table's history in one fixed-shape gather, ``fired`` takes the earliest hit position with a
scatter-min, and each rule's last row writes the new history. A steer rule's edit sits in the row's
slots behind a gate (the rule's row in the table): it adds from the position where the rule fired on,
as the segment path's ``GuardState.gate`` does; a rule's steering vector likewise.

What needs variable shapes stays on the segment path (``hook.py``): top-k readouts and TopK SAEs
(both need the full encode), and requests that name more features than there are slots (or more
triggers than lanes), which ``FixedTables.fill`` refuses with ``CapacityError`` rather than steer
them partly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sae_serve.errors import SaeServeError, SpecError
from sae_serve.sae.model import FeatureSubset, SparseAutoencoder
from sae_serve.sae.registry import LinearProbe
from sae_serve.steering.guardrails import HISTORY, GuardTable
from sae_serve.steering.hook import FeatureActivations, read_features
from sae_serve.steering.plan import RequestPlan, SaePlan, Segment
from sae_serve.steering.spec import MAX_WINDOW, ResolvedRequest


class CapacityError(SaeServeError):
    """A step's plan does not fit the fixed tables."""


@dataclass(frozen=True)
class Capacity:
    tokens: int
    """Rows per step (vLLM's max_num_batched_tokens)."""
    slots: int = 16
    """Features one request may edit and read on one SAE (its rules' edits and triggers included)."""
    requests: int = 256
    """Requests with a steering vector in one step (vLLM's max_num_seqs)."""
    lanes: int = 0
    """Guardrail triggers one request may have read at one SAE (0: guardrails take the segment path)."""


def _triggers(plan: RequestPlan) -> list[int]:
    """The features the plan's rules trigger on here that are not among its own (they take slots too)."""
    own, extra = set(plan.host.features.tolist()), []
    for guard in plan.guards:
        feature = guard.state.rule.feature
        if guard.reads and guard.probe is None and feature not in own and feature not in extra:
            extra.append(feature)
    return extra


def misfit(plan: RequestPlan, capacity: Capacity) -> str | None:
    """Why the fixed op cannot run ``plan`` (None: it can)."""
    if plan.full_encode:
        return "a top-k readout or a TopK SAE needs the full encode"
    features = len(plan.host.features) + len(_triggers(plan))
    if features > capacity.slots:
        return f"{features} features (its rules' triggers included) exceed op.slots={capacity.slots}"
    if not plan.guards:
        return None
    if not capacity.lanes:
        return "guardrails need guardrail lanes (config op.guard_lanes)"
    triggers = sum(guard.reads for guard in plan.guards)
    if triggers > capacity.lanes:
        return f"{triggers} guardrail triggers on one SAE exceed op.guard_lanes={capacity.lanes}"
    if sum(guard.vector is not None for guard in plan.guards) > 1:
        return "two steer rules add steering vectors on one SAE"
    return None


def fits(plan: RequestPlan, capacity: Capacity) -> bool:
    """Whether the fixed op can run ``plan`` (else it takes the segment path)."""
    return misfit(plan, capacity) is None


def check_runnable(request: ResolvedRequest, slots: int, lanes: int = 0) -> None:
    """Refuse, naming the field, a request that the fixed op alone (CUDA graphs) could run only
    partly: it is never steered silently less than it asked."""
    readout = request.readout
    if readout is not None and readout.top_k is not None:
        raise SpecError("return_features.top_k", "this server replays CUDA graphs, which cannot rank every "
                        "feature per token; name the features to read instead")
    for sae in request.sae_names():
        edited = request.edits[sae].features if sae in request.edits else ()
        read = readout.features if readout is not None and readout.sae == sae and readout.features else ()
        rules = request.guardrails
        triggers = [rule for rule in rules if rule.site == sae]
        guarded = [f for rule in rules if sae in rule.edits for f in rule.edits[sae].features]
        watched = [rule.feature for rule in triggers if rule.feature is not None]
        named = len(set(edited) | set(read) | set(guarded) | set(watched))  # they share the slots, as in the plan
        field = "guardrails" if rules and not (edited or read) else "steering.interventions"
        if named > slots:
            raise SpecError(field, f"{named} features on SAE {sae!r} exceed this server's "
                            f"capacity of {slots} per request (config op.slots)")
        if len(triggers) > lanes:
            raise SpecError("guardrails", f"{len(triggers)} guardrail triggers on SAE {sae!r} exceed this server's "
                            f"capacity of {lanes} per request (config op.guard_lanes)")
        if sum(sae in rule.vectors for rule in rules) > 1:  # (resolve refuses two rules editing one feature)
            raise SpecError("guardrails", f"two steer rules add steering vectors on SAE {sae!r}, which this "
                            "server's CUDA graphs cannot gate apart; merge them into one rule")


class FixedTables:
    """The persistent tables of one SAE site, on the SAE's device. ``guards``: the engine's rule
    table (needed when ``capacity.lanes``); ``probes``: the probes read at this site."""

    def __init__(self, sae: SparseAutoencoder, capacity: Capacity, guards: GuardTable | None = None,
                 probes: list[LinearProbe] | tuple[LinearProbe, ...] = ()) -> None:
        if sae.cfg.architecture == "topk":
            raise SaeServeError("the fixed-shape op encodes feature subsets: a topk SAE needs the segment path")
        if capacity.lanes and guards is None:
            raise SaeServeError("guardrail lanes need the engine's rule table")
        t, s, device, dtype = capacity.tokens, capacity.slots, sae.W_dec.device, sae.dtype
        self.capacity, self.guards = capacity, guards
        self.index = torch.zeros(t, s, dtype=torch.long, device=device)
        self.mult = torch.ones(t, s, dtype=dtype, device=device)
        self.offset = torch.zeros(t, s, dtype=dtype, device=device)
        self.vector_row = torch.zeros(t, dtype=torch.long, device=device)
        # Row 0 is zeros; each request banks at most two: its own vector and its steer rule's (``misfit``).
        self.vectors = torch.zeros(2 * capacity.requests + 1, sae.d_in, dtype=dtype, device=device)
        self.activations = torch.zeros(t, s, dtype=dtype, device=device)  # written by the op: readouts
        self._filled = 0  # rows written by the last fill, reset by the next
        self.lanes = GuardLanes(capacity, sae, probes) if capacity.lanes else None

    def fill(self, plan: SaePlan) -> None:
        """Write one step's segments into the tables; rows of other requests become no-ops."""
        cap, rows = self.capacity, max((seg.rows.end for seg in plan), default=0)
        if rows > cap.tokens:
            raise CapacityError(f"a step of {rows} tokens exceeds the fixed op's capacity of {cap.tokens}")
        index, mult = np.zeros((rows, cap.slots), dtype=np.int64), np.ones((rows, cap.slots), dtype=np.float32)
        offset, vector_row = np.zeros((rows, cap.slots), dtype=np.float32), np.zeros(rows, dtype=np.int64)
        vectors: list[torch.Tensor] = []
        lanes = self.lanes.host(rows) if self.lanes is not None else None  # (None: no rule runs here)
        for seg in plan:
            p, start, end = seg.plan, seg.rows.start, seg.rows.end
            if (why := misfit(p, cap)) is not None:
                raise CapacityError(f"request {seg.request}: {why}")
            m = len(p.host.features)
            index[start:end, :m] = p.host.features
            first, last = seg.rows.scope(p.positions)
            if p.mult is not None:
                mult[start + first:start + last, :m] = p.host.mult
                offset[start + first:start + last, :m] = p.host.offset
            if p.vector is not None:
                vector_row[start + first:start + last] = self._bank(vectors, p.vector)
            if p.guards and lanes is not None:
                extra = _triggers(p)
                index[start:end, m:m + len(extra)] = extra
                slots = {int(f): j for j, f in enumerate([*p.host.features.tolist(), *extra])}
                lanes.add(seg, {**slots, **self.lanes.probe_column}, lambda vector: self._bank(vectors, vector))
        self._reset(rows)
        self.index[:rows].copy_(torch.from_numpy(index), non_blocking=True)
        self.mult[:rows].copy_(torch.from_numpy(mult), non_blocking=True)
        self.offset[:rows].copy_(torch.from_numpy(offset), non_blocking=True)
        self.vector_row[:rows].copy_(torch.from_numpy(vector_row), non_blocking=True)
        if vectors:
            self.vectors[1:len(vectors) + 1] = torch.stack(vectors)
        if self.lanes is not None and lanes is not None:
            self.lanes.write(lanes, self._filled)
        self._filled = rows

    def _bank(self, vectors: list[torch.Tensor], vector: torch.Tensor) -> int:
        """``vector``'s row in this step's vector bank."""
        if len(vectors) == len(self.vectors) - 1:
            raise CapacityError(f"more than {len(self.vectors) - 1} steering vectors in one step")
        vectors.append(vector)
        return len(vectors)

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


LANE_TABLES: dict[str, tuple[str | None, type, float]] = {
    # name: (its columns: one per lane, per slot, or none; host dtype; idle value, a no-op)
    "position": (None, np.int64, 0), "slot": ("lanes", np.int64, 0), "column": ("lanes", np.int64, 0),
    "threshold": ("lanes", np.float32, np.inf), "tokens": ("lanes", np.int64, 1), "window": ("lanes", np.int64, 1),
    "active": ("lanes", np.bool_, False), "back": ("lanes", np.int64, 0), "last": ("lanes", np.bool_, False),
    "gate_slot": ("slots", np.int64, 0), "gate_mult": ("slots", np.float32, 1), "gate_offset": ("slots", np.float32, 0),
    "gate_vector_row": (None, np.int64, 0), "gate_vector_slot": (None, np.int64, 0),
}
"""A site's guardrail lanes and gates (module docstring); slot 0 of the rule table is its sink."""


def _lane_shape(rows: int, columns: str | None, capacity: Capacity) -> tuple[int, ...]:
    return (rows,) if columns is None else (rows, getattr(capacity, columns))


class _HostLanes:
    """One step's guardrail lanes on the host, filled request by request (``GuardLanes.host``)."""

    def __init__(self, rows: int, capacity: Capacity) -> None:
        for name, (columns, dtype, idle) in LANE_TABLES.items():
            setattr(self, name, np.full(_lane_shape(rows, columns, capacity), idle, dtype=dtype))

    def add(self, seg: Segment, column: dict[int | str, int], bank: Callable[[torch.Tensor], int]) -> None:
        """A request's rules: a lane per trigger read here, a gate per edited slot and vector.
        ``column``: where each feature (its slot) and probe (after the slots) of the row is."""
        p, start, end, r = seg.plan, seg.rows.start, seg.rows.end, seg.rows
        self.position[start:end] = np.arange(r.first_position, r.first_position + end - start)
        for lane, guard in enumerate(g for g in p.guards if g.reads):
            rule = guard.state.rule
            col = column[rule.probe if guard.probe is not None else rule.feature]  # type: ignore[index]
            here = (slice(start, end), lane)
            self.slot[here], self.column[here], self.threshold[here] = guard.state.slot, col, rule.threshold
            self.tokens[here], self.window[here] = rule.tokens, rule.window
            watched = guard.state.watch(col, start, r.first_position, r.scope(rule.positions))
            if watched is not None:  # (rows watched before, by a preempted request, are not again)
                rows = slice(watched.row, watched.row + watched.count)
                self.active[rows, lane] = True
                self.back[rows, lane] = np.arange(watched.count)
                self.last[watched.row + watched.count - 1, lane] = True
        for guard in p.guards:
            if guard.host is not None:
                edited = np.flatnonzero((guard.host[0] != 1) | (guard.host[1] != 0))
                self.gate_slot[start:end, edited] = guard.state.slot
                self.gate_mult[start:end, edited] = guard.host[0][edited]
                self.gate_offset[start:end, edited] = guard.host[1][edited]
            if guard.vector is not None:
                self.gate_vector_row[start:end] = bank(guard.vector)
                self.gate_vector_slot[start:end] = guard.state.slot


class GuardLanes:
    """A site's persistent guardrail lanes and gates (module docstring), and its probes."""

    def __init__(self, capacity: Capacity, sae: SparseAutoencoder, probes: list[LinearProbe] | tuple[LinearProbe, ...]
                 ) -> None:
        t, lanes, slots, device, dtype = capacity.tokens, capacity.lanes, capacity.slots, sae.W_dec.device, sae.dtype
        self.capacity = capacity
        self.probe_column = {probe.name: slots + j for j, probe in enumerate(probes)}
        self.directions = torch.stack([p.direction.float() for p in probes]).to(device) if probes else None
        self.bias = torch.tensor([p.bias for p in probes], dtype=torch.float32, device=device)
        self.sigmoid = torch.tensor([p.sigmoid for p in probes], dtype=torch.bool, device=device)
        self.steps = torch.arange(MAX_WINDOW, device=device)  # k: how many watched rows back
        self.rows = torch.arange(t, device=device)
        self.lane = torch.arange(lanes, device=device)
        for name, (columns, host_dtype, idle) in LANE_TABLES.items():
            kind = dtype if name in ("gate_mult", "gate_offset") else torch.from_numpy(np.empty(0, host_dtype)).dtype
            setattr(self, name, torch.full(_lane_shape(t, columns, capacity), idle, dtype=kind, device=device))

    def host(self, rows: int) -> _HostLanes:
        return _HostLanes(rows, self.capacity)

    def write(self, host: _HostLanes, previous: int) -> None:
        """Copy a step's lanes in; rows the previous step wrote beyond them become inactive again."""
        rows = len(host.position)
        for name, array in vars(host).items():
            table = getattr(self, name)
            table[:rows].copy_(torch.from_numpy(array), non_blocking=True)
            if previous > rows:
                table[rows:previous] = LANE_TABLES[name][2]

    def observe_(self, guards: GuardTable, stream: torch.Tensor, acts: torch.Tensor) -> None:
        """Update every watched rule from this step's rows (``stream``: the unedited residual stream)."""
        n = stream.shape[0]
        values = acts.float()
        if self.directions is not None:
            logits = stream.float() @ self.directions.T + self.bias
            values = torch.cat([values, torch.where(self.sigmoid, torch.sigmoid(logits), logits)], dim=1)
        slot, active, k = self.slot[:n], self.active[:n], self.steps
        above = (values.gather(1, self.column[:n]) > self.threshold[:n]) & active  # (n, lanes)
        back = self.back[:n].unsqueeze(2)  # (n, lanes, 1): the rule's watched rows before this one
        in_step = k <= back
        step_bits = above[(self.rows[:n, None, None] - k).clamp(min=0), self.lane[None, :, None]]
        h = HISTORY - (k - back)  # where k rows back sits in the rule's history (oldest first)
        history = guards.history[slot.unsqueeze(2), h.clamp(0, HISTORY - 1)] & (h >= 0)
        bits = torch.where(in_step, step_bits, history)  # (n, lanes, MAX_WINDOW): newest first
        hit = active & ((bits & (k < self.window[:n].unsqueeze(2))).sum(2) >= self.tokens[:n])
        never = torch.iinfo(torch.long).max
        first = torch.full_like(guards.fired, never).scatter_reduce(
            0, slot.flatten(), torch.where(hit, self.position[:n, None], never).flatten(), "amin")
        guards.fired.copy_(torch.where(guards.fired >= 0, guards.fired, torch.where(first < never, first, -1)))
        # Each rule's last watched row this step holds its newest HISTORY bits; the rest go to the sink.
        target = torch.where(self.last[:n], slot, 0).flatten()
        guards.history.index_put_((target,), bits[:, :, :HISTORY].flip(2).reshape(-1, HISTORY))
        guards.history[0] = False
        self.active[:n], self.last[:n] = False, False  # watched once: a forward the host did not plan sees none

    def gates(self, guards: GuardTable, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, slots) and (rows, 1): whether each gated slot and gated vector is on at its row."""
        fired = guards.fired[self.gate_slot[:n]]
        on = (fired >= 0) & (self.position[:n, None] >= fired)
        vector = guards.fired[self.gate_vector_slot[:n]]
        return on, ((vector >= 0) & (self.position[:n] >= vector)).unsqueeze(1)


def steer_fixed_(hidden: torch.Tensor, residual: torch.Tensor, sae: SparseAutoencoder, tables: FixedTables) -> None:
    """Edit ``hidden`` (tokens, d_in) in place from the tables; the stream is hidden + residual.
    Every shape is (tokens, ...) with tokens the padded batch: graph-capturable."""
    n = hidden.shape[0]
    index = tables.index[:n]
    stream = hidden + residual
    x = sae._encoder_input(stream)
    pre = torch.bmm(sae.encoder_rows[index], x.unsqueeze(-1)).squeeze(-1) + sae.b_enc[index]
    threshold = getattr(sae, "threshold", None)
    acts = sae._activate_subset(pre, FeatureSubset(index, None, None,  # type: ignore[arg-type]
                                                    None if threshold is None else threshold[index]))
    tables.activations[:n].copy_(acts)
    coef = (tables.mult[:n] - 1) * acts + tables.offset[:n]
    vectors = tables.vectors[tables.vector_row[:n]]
    lanes = tables.lanes
    if lanes is not None and tables.guards is not None:  # the rules read here first, then the gated edits
        lanes.observe_(tables.guards, stream, acts)
        on, vector_on = lanes.gates(tables.guards, n)
        coef = coef + on * ((lanes.gate_mult[:n] - 1) * acts + lanes.gate_offset[:n])
        vectors = vectors + vector_on * tables.vectors[lanes.gate_vector_row[:n]]
    # Each row's weighted sum of its own decoder rows, without gathering them first (a bag per row).
    delta = F.embedding_bag(index, sae.W_dec, per_sample_weights=coef, mode="sum")
    hidden += (delta + vectors).to(hidden.dtype)


def fixed_readout(tables: FixedTables, seg: Segment) -> FeatureActivations:
    """A reading request's activations, from the slots the op wrote (slot order is plan order)."""
    return read_features(seg, tables.activations[seg.rows.start:seg.rows.end])
