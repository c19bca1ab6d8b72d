"""Turn a forward step's requests into per-request work for one SAE site.

Two stages, so that per-step work is only slicing:
- ``prepare`` (once per request and SAE): the request's own feature set S, its affine targets
  ``t = mult * a + offset`` over S, the gathered encoder and decoder slices of S, its summed
  steering vector and its readout.
- ``build_plan`` (every step): an engine flattens its batch to ``(tokens, d_in)`` rows and says
  which rows belong to which request (``RequestRows``); each request that has prepared work
  becomes a ``Segment``.
Each segment is computed on its own, so the arithmetic a request sees (matrix shapes, summation
order) depends on that request alone: its result is bit-identical whatever its neighbours ask.
A step in which nobody steers or reads this SAE gives an empty plan: the hook does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from sae_serve.sae.model import FeatureSubset, SparseAutoencoder
from sae_serve.sae.registry import LinearProbe
from sae_serve.steering.guardrails import GuardPlan, GuardState, GuardTable, GuardTableFull
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

    def scope(self, positions: Positions) -> tuple[int, int]:
        """The local row range [a, b) that ``positions`` covers; prompt rows always come first."""
        n = self.end - self.start
        prompt_rows = min(n, max(0, self.prompt_len - self.first_position))
        return {"all": (0, n), "prompt": (0, prompt_rows), "generated": (prompt_rows, n)}[positions]


class HostSlots(NamedTuple):
    """A plan's features and edit on the host, so that filling the fixed op's tables each step
    never waits for the GPU (a device-to-host read would sync with the step still running).
    numpy, because the fill writes them for every request of every step: a numpy slice write
    costs a tenth of a torch one."""

    features: np.ndarray  # (m,) int64
    mult: np.ndarray  # (m,) float64, 1 for read-only features and for plans that do not edit
    offset: np.ndarray  # (m,) float64


@dataclass(frozen=True)
class RequestPlan:
    """One request's work on one SAE, prepared once."""

    features: torch.Tensor  # (m,) long: the features this request edits or reads
    full_encode: bool  # every feature is encoded (a TopK SAE, or a top-k readout)
    subset: FeatureSubset | None  # encoder slices of ``features``; None with full_encode or without slices
    w_dec: torch.Tensor  # (m, d_in) decoder rows of ``features`` ((0, d_in) without slices)
    mult: torch.Tensor | None  # (m,) multiplier of a (1 for read-only features); None: no edit
    offset: torch.Tensor | None  # (m,) offset (0 for read-only features)
    vector: torch.Tensor | None  # (d_in,) summed steering vectors
    positions: Positions  # which rows the edit covers
    top_k: int | None  # readout: the k most active features per row
    read_columns: torch.Tensor | None  # readout: columns of ``features`` to report
    host: HostSlots  # ``features``, ``mult`` and ``offset`` on the host
    guards: tuple[GuardPlan, ...] = ()  # guardrails read or steering here (the segment path runs them)

    @property
    def steers(self) -> bool:
        return self.mult is not None or self.vector is not None

    @property
    def reads(self) -> bool:
        return self.top_k is not None or self.read_columns is not None


def _guard_features(sae_name: str, states: Sequence[GuardState]) -> list[int]:
    """The features the request's rules edit on this SAE (triggers are read apart, ``observe_triggers``)."""
    return [f for state in states if sae_name in state.rule.edits for f in state.rule.edits[sae_name].features]


def _guard_plan(sae_name: str, state: GuardState, column: dict[int, int], sae: SparseAutoencoder,
                probes: Mapping[str, LinearProbe]) -> GuardPlan | None:
    rule, m = state.rule, len(column)
    here = rule.site == sae_name
    edit, vector = rule.edits.get(sae_name), rule.vectors.get(sae_name)
    if not here and edit is None and vector is None:
        return None
    mult = offset = host = None
    if edit is not None:
        host = np.ones(m), np.zeros(m)
        for f, a, c in zip(edit.features, edit.mult, edit.offset, strict=True):
            host[0][column[f]], host[1][column[f]] = a, c
        mult, offset = (torch.tensor(t, device=sae.W_dec.device, dtype=sae.dtype) for t in host)
    return GuardPlan(state, here, probes[rule.probe] if here and rule.probe is not None else None, mult, offset,
                     None if vector is None else vector.to(device=sae.W_dec.device, dtype=sae.dtype), host)


def prepare(sae_name: str, req: ResolvedRequest | None, sae: SparseAutoencoder, slices: bool = True,
            states: Sequence[GuardState] = (), probes: Mapping[str, LinearProbe] | None = None) -> RequestPlan | None:
    """The request's work on SAE ``sae_name`` in the SAE's dtype and device, or None. Without
    ``slices`` (the fixed op gathers from the SAE itself) no encoder or decoder rows are copied.
    ``states``: the request's guardrails (``probes``: the probes they may name)."""
    if req is None or sae_name not in req.sae_names():
        return None
    device, dtype = sae.W_dec.device, sae.dtype
    edit = req.edits.get(sae_name)
    readout = req.readout if req.readout and req.readout.sae == sae_name else None
    read_list = readout.features if readout else None
    features = list(edit.features) if edit else []
    for f in [*(read_list or ()), *_guard_features(sae_name, states)]:
        if f not in features:
            features.append(f)
    m = len(features)
    host = HostSlots(np.array(features, dtype=np.int64), np.ones(m), np.zeros(m))
    if edit is not None:
        host.mult[: len(edit.features)] = edit.mult
        host.offset[: len(edit.features)] = edit.offset
    index = torch.tensor(host.features, device=device)
    mult = None if edit is None else torch.tensor(host.mult, dtype=dtype, device=device)
    offset = None if edit is None else torch.tensor(host.offset, dtype=dtype, device=device)
    column = {f: j for j, f in enumerate(features)}
    full = sae.cfg.architecture == "topk" or (readout is not None and readout.top_k is not None)
    return RequestPlan(
        features=index, full_encode=full, subset=None if full or not slices else sae.subset(index),
        w_dec=sae.W_dec[index] if slices else sae.W_dec[:0],
        mult=mult, offset=offset,
        vector=req.vectors[sae_name].to(device=device, dtype=dtype) if sae_name in req.vectors else None,
        positions=req.positions, top_k=readout.top_k if readout else None,
        read_columns=torch.tensor([column[f] for f in read_list], device=device) if read_list else None,
        host=host,
        guards=tuple(g for g in (_guard_plan(sae_name, st, column, sae, probes or {}) for st in states) if g),
    )


def prepare_all(req: ResolvedRequest | None, saes: Mapping[str, SparseAutoencoder], slices: bool = True,
                probes: Mapping[str, LinearProbe] | None = None, table: GuardTable | None = None
                ) -> dict[str, RequestPlan]:
    """``prepare`` for every SAE the request names. Each guardrail whose trigger SAE is among
    ``saes`` gets one state in ``table``, shared by the plans it spans (``guard_states`` finds them)."""
    rules = [rule for rule in (req.guardrails if req else ()) if rule.site in saes]
    states: list[GuardState] = []
    if rules:
        table = table or GuardTable(saes[rules[0].site].W_dec.device)
        try:
            for rule in rules:
                states.append(table.allocate(rule))
        except GuardTableFull:  # (none of them, then)
            table.release(states)
            raise
    plans = {name: prepare(name, req, sae, slices, states, probes) for name, sae in saes.items()}
    return {name: plan for name, plan in plans.items() if plan is not None}


def guard_states(plans: Mapping[str, RequestPlan]) -> list[GuardState]:
    """A request's guardrail states, once each."""
    return list({id(g.state): g.state for plan in plans.values() for g in plan.guards}.values())


@dataclass(frozen=True)
class Segment:
    """One request's work on one SAE in one forward step."""

    request: int
    """Index of the request in the step's request list."""
    rows: RequestRows
    plan: RequestPlan


SaePlan = tuple[Segment, ...]


def build_plan(plans: Sequence[RequestPlan | None], layout: Sequence[RequestRows]) -> SaePlan:
    """Segments for one SAE: ``plans[i]`` (None: plain request) owns rows ``layout[i]``."""
    return tuple(
        Segment(i, rows, plan) for i, (plan, rows) in enumerate(zip(plans, layout, strict=True))
        if plan is not None and rows.end > rows.start
    )
