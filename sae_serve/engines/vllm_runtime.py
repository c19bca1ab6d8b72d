"""Per-worker steering state: the loaded SAEs, each live request's plans, readouts, watches.

Either model runner hands the runtime its batch before each forward (``plan_step``); the op
(``vllm_site.py``) then calls ``apply`` at each SAE's layer, and at each other exposed layer
(where it only copies out the hidden states that requests read). A request's spec is read once, from
its ``extra_args``, and acted on only when the service signed it (``protocol.admitted_spec``):
anything else under a sae_serve key is ignored and counted. When no request in the step steers or
reads, and nothing is watched, the op returns at once and touches nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from pydantic import ValidationError

from sae_serve.config import LimitsConfig, OpConfig
from sae_serve.engines.protocol import (
    UnauthenticatedSpec,
    WorkerCapabilities,
    WorkerReply,
    admitted_spec,
    secret_id,
)
from sae_serve.engines.readouts import ReadoutStore
from sae_serve.engines.state_copies import Capture, Part, StateBuffers, StateCopies
from sae_serve.errors import SpecError
from sae_serve.metrics import SilentMetrics, WorkerMetrics, worker_metrics
from sae_serve.sae.registry import LoadedSae, SaeRegistry
from sae_serve.steering.fixed import FixedTables, fits, fixed_readout, misfit, steer_fixed_
from sae_serve.steering.guardrails import GuardState, GuardTable, GuardTableFull, release
from sae_serve.steering.hook import apply_plan_split_
from sae_serve.steering.plan import RequestPlan, RequestRows, SaePlan, Segment, build_plan, guard_states, prepare_all
from sae_serve.steering.spec import Guardrail, RequestSpec, ResolvedHiddenStates, resolve
from sae_serve.steering.watch import Watch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepBatch:
    """A forward step's requests as either model runner describes them."""

    req_ids: list[str]
    query_start_loc: list[int]  # (n + 1,) row boundaries of each request's tokens
    computed: list[int]  # tokens of each request already in the KV cache
    prompt_lens: list[int]

    def layout(self) -> list[RequestRows]:
        qsl = self.query_start_loc
        return [RequestRows(qsl[i], qsl[i + 1], self.computed[i], self.prompt_lens[i])
                for i in range(len(self.req_ids))]


@dataclass(frozen=True)
class _Live:
    """A live request as the runtime knows it."""

    key: str | None  # an admitted request's readout key (None: not admitted; the server's rules only)
    plans: dict[str, RequestPlan]  # its prepared work by SAE name
    hidden: ResolvedHiddenStates | None = None  # the hidden states it reads


NOT_ADMITTED = _Live(None, {})


@dataclass
class _Step:
    plans: list[dict[str, RequestPlan]]  # per request: its prepared work by SAE name
    layout: list[RequestRows]
    keys: list[str | None]
    tokens: int  # real (unpadded) rows in the step
    segments: dict[str, SaePlan]  # per SAE: the work of the segment path (the fixed op's is in its tables)
    captures: dict[int, Capture] = field(default_factory=dict)  # layer -> hidden states to copy out


@dataclass
class SteeringRuntime:
    """Per-worker state. ``secret``: the deployment's signing key (None: no request is admitted)."""

    registry: SaeRegistry
    secret: bytes | None = None
    graph_mode: bool = False  # CUDA graphs: the op runs the fixed tables only, every step
    max_model_len: int = 0
    slots: int = OpConfig().slots
    metrics: WorkerMetrics | SilentMetrics = field(default_factory=worker_metrics)
    readouts: ReadoutStore = field(default_factory=lambda: ReadoutStore.of(LimitsConfig()))
    monitoring: bool = False  # watch features and time the hook
    reports: bool = True  # answers for its stage (readouts, metrics): the first tensor-parallel rank
    local: frozenset[str] | None = None  # the SAEs this process runs (None: all; a pipeline stage: its own)
    counts_requests: bool = True  # counts refused specs (one worker of the deployment does)
    speculative: bool = False  # speculative decoding on: no readouts (rejected drafts would be in them)
    stop_token: int | None = None  # what the sampler emits for a request a guardrail aborted: the EOS
    server_rules: tuple[Guardrail, ...] = ()  # the config's guardrails: on every request, signed or not
    pipeline: bool = False  # a pipeline stage: no guardrails (a rule's trigger and its action may be apart)
    hidden_layers: tuple[int, ...] = ()  # the layers whose hidden states requests may read (this stage's)
    d_model: int = 0
    device: torch.device | None = None  # the model's (None: the SAEs', else the CPU)
    lanes: int = 0  # guardrail lanes of the fixed op's tables (``_prepare_ops`` sets them)
    resolved: dict[str, _Live] = field(default_factory=dict)
    step: _Step | None = None
    watches: dict[str, Watch] = field(default_factory=dict)
    tables: dict[str, FixedTables] = field(default_factory=dict)  # SAE name -> the fixed op's tables
    pending: list[tuple[str, str, Segment]] = field(default_factory=list)  # fixed-op readouts to collect
    state_buffers: StateBuffers | None = None  # graph mode: where the op copies exposed layers' streams
    pending_states: dict[int, Capture] = field(default_factory=dict)  # graph mode: the last step's, to gather
    copies: StateCopies = field(default_factory=StateCopies)  # hidden states on their way to the store
    abort_rules: dict[str, list[GuardState]] = field(default_factory=dict)  # by request id: its abort rules
    aborts: list[tuple[int, list[GuardState]]] = field(default_factory=list)  # this step: (row, abort rules)

    def __post_init__(self) -> None:
        self.saes = {name: loaded.sae for name, loaded in self.registry.saes.items()
                     if self.local is None or name in self.local}
        if self.device is None:
            self.device = next(iter(self.saes.values())).W_dec.device if self.saes else torch.device("cpu")
        self.guard_table = GuardTable(self.device)  # every live request's rules

    def capabilities(self) -> WorkerCapabilities:
        return WorkerCapabilities(self.graph_mode, self.slots, self.max_model_len, secret_id(self.secret),
                                  self.speculative, self.stop_token, self.pipeline, self.hidden_layers, self.d_model,
                                  self.lanes)

    def enable_monitoring(self, firing_fraction: float, max_rows: int) -> None:
        """Watch each SAE's watchlist on every token (``max_rows``: the most rows in a step)."""
        self.monitoring = True
        for name in self.saes:
            loaded = self.registry.saes[name]
            if not loaded.watchlist or loaded.sae.cfg.architecture == "topk":
                continue
            catalog = loaded.catalog
            names = [catalog.label_of(f) or str(f) for f in loaded.watchlist]
            self.watches[name] = Watch(
                loaded.sae, name, list(loaded.watchlist), names,
                [firing_fraction * (catalog.info(f).max_activation or 0.0) for f in loaded.watchlist], max_rows)
            self.metrics.declare_watched(name, names)

    def _reject(self, reason: str) -> None:
        if self.counts_requests:
            self.metrics.rejected_specs.labels(reason).inc()

    def _resolve(self, req_id: str, extra_args: dict[str, Any] | None) -> _Live:
        """The request's key (if admitted) and work. The server's own guardrails join every request
        here, whatever route it came by and whether the service signed it or not."""
        if not extra_args and not self.server_rules:  # a plain request, or one of vLLM's dummy batches
            return NOT_ADMITTED
        if req_id not in self.resolved:
            self.resolved[req_id] = NOT_ADMITTED
            try:
                admitted = admitted_spec(extra_args, self.secret)
            except UnauthenticatedSpec as exc:
                self._reject("unauthenticated")
                logger.warning("request %s: %s; served without steering", req_id, exc)
                admitted = None
            if admitted is not None:
                key, spec_json = admitted
                self.readouts.resume(key)  # (again, after a preemption: it is live)
                self.resolved[req_id] = self._plans(req_id, key, spec_json)
            elif self.server_rules:
                self.resolved[req_id] = self._plans(req_id, None, "{}")
        return self.resolved[req_id]

    def _plans(self, req_id: str, key: str | None, spec_json: str) -> _Live:
        try:
            spec = RequestSpec.model_validate_json(spec_json)
            request = resolve(spec.model_copy(update={"server_guardrails": list(self.server_rules)}), self.registry)
        except (ValidationError, SpecError) as exc:  # the service checked it: a deployment out of step
            self._reject("invalid")
            logger.error("admitted spec %s is invalid on this worker: %s", key, exc)
            if key is not None:
                self.readouts.fail(key, f"a worker could not run the admitted spec: {exc}")
            return _Live(key, {})
        try:
            plans = prepare_all(request, self.saes, slices=not self.graph_mode, probes=self.registry.probes,
                                table=self.guard_table)
        except GuardTableFull as exc:  # fail closed: the request stops at once rather than run unwatched
            self._reject("unrunnable")
            logger.error("request %s: %s; stopped", req_id, exc)
            if key is not None:
                self.readouts.fail(key, str(exc))
            self.abort_rules[req_id] = [self.guard_table.tripwire(request.guardrails[0])]
            return _Live(key, {})
        states = guard_states(plans)
        if key is not None:
            self.readouts.guard(key, states)
        if aborts := [s for s in states if s.rule.action == "abort"]:
            self.abort_rules[req_id] = aborts
        return _Live(key, plans, request.hidden)

    def begin_step(self, runner: Any) -> None:
        """The V1 runner's batch, before its forward."""
        batch = runner.input_batch
        n = batch.num_reqs
        req_ids = list(batch.req_ids[:n])
        step = StepBatch(req_ids, runner.query_start_loc.cpu[: n + 1].tolist(),
                         [int(c) for c in batch.num_computed_tokens_cpu[:n]],
                         [runner.requests[rid].num_prompt_tokens for rid in req_ids])
        params = {rid: runner.requests[rid].sampling_params for rid in req_ids}
        self.plan_step(step, {rid: p.extra_args if p else None for rid, p in params.items()}, runner.requests)

    def plan_step(self, batch: StepBatch, extra_args: dict[str, dict[str, Any] | None], live: Any) -> None:
        """Map a step's requests to rows and fill the fixed op's tables; ``step`` stays None when
        nobody steers, reads or is watched. ``live``: the ids of the runner's current requests."""
        self.collect_readouts()
        if self.graph_mode:  # inside graphs the op adds to the totals; publish what has landed
            for watch in self.watches.values():
                watch.publish(self.metrics)
                watch.set_live(batch.query_start_loc[-1])
        self._forget(set(self.resolved) - set(live))
        requests = [self._resolve(rid, extra_args.get(rid)) for rid in batch.req_ids]
        plans, keys = [r.plans for r in requests], [r.key for r in requests]
        self.aborts = [(row, self.abort_rules[rid]) for row, rid in enumerate(batch.req_ids) if rid in self.abort_rules]
        self.step = None
        reading = self.reports and any(r.hidden for r in requests)  # (one rank of a stage answers)
        captures = self._captures(requests, batch.layout()) if reading else {}
        if self.graph_mode:  # the op copies every exposed layer; the rows are gathered after the forward
            self.pending_states, captures = captures, {}
        if batch.req_ids and (self.monitoring or any(plans) or captures):
            layout = batch.layout()  # (built only for a step that does work: the idle path stays bare)
            self.step = _Step(plans, layout, keys, batch.query_start_loc[-1], {}, captures)
            for name in self.saes:
                self.step.segments[name] = self._split(name, build_plan([p.get(name) for p in plans], layout), keys)
        elif self.graph_mode:
            for tables in self.tables.values():
                tables.fill(())

    def _captures(self, live: list[_Live], layout: list[RequestRows]) -> dict[int, Capture]:
        """Per layer, the step's rows whose hidden states a request reads, grouped by request."""
        wanted: dict[int, tuple[list[int], list[Part]]] = {}
        for request, rows in zip(live, layout, strict=True):
            hidden = request.hidden
            if hidden is None or request.key is None:
                continue
            picked = hidden.pick(rows.first_position, rows.end - rows.start, rows.prompt_len)
            if not picked:
                continue
            positions = torch.tensor(picked)
            for layer in hidden.layers:
                if layer in self.hidden_layers:
                    all_rows, parts = wanted.setdefault(layer, ([], []))
                    all_rows += [rows.start + p - rows.first_position for p in picked]
                    parts.append((request.key, positions, getattr(torch, hidden.dtype)))
        return {layer: Capture(torch.tensor(rows).to(self.device, non_blocking=True), parts)
                for layer, (rows, parts) in wanted.items()}

    def _forget(self, gone: set[str]) -> None:
        """Requests that left the runner (finished or aborted): their readouts start to expire."""
        for req_id in gone:
            request = self.resolved.pop(req_id)
            self.abort_rules.pop(req_id, None)
            if request.key is None:  # (an admitted request's rules stay in its readout entry until fetched)
                release(guard_states(request.plans))
            else:
                self.readouts.finish(request.key)
        self.readouts.expire()
        self.metrics.readout_bytes.set(self.readouts.nbytes)

    def _split(self, name: str, plan: SaePlan, keys: list[str | None]) -> SaePlan:
        """Put what fits into the fixed op's tables; return the rest, for the segment path."""
        tables = self.tables.get(name)
        if tables is None:
            return plan
        fixed: list[Segment] = []
        rest: list[Segment] = []
        for seg in plan:
            (fixed if fits(seg.plan, tables.capacity) else rest).append(seg)
        if self.graph_mode and rest:  # a captured graph cannot run the segment path
            for seg in rest:  # (the service refuses these up front: reaching here is a deployment out of step)
                self._reject("unrunnable")
                if (key := keys[seg.request]) is not None:
                    self.readouts.fail(key, f"SAE {name!r}: CUDA graphs cannot run this request "
                                       f"({misfit(seg.plan, tables.capacity)})")
            rest = []
        tables.fill(fixed)
        self.pending += [(key, name, seg) for seg in fixed if seg.plan.reads and (key := keys[seg.request])]
        return tuple(rest)

    def collect_readouts(self, wait_for: Collection[str] = ()) -> None:
        """Readouts the fixed op wrote during the last forward, and the hidden states copied out so
        far (all of those of the keys in ``wait_for``)."""
        for key, name, seg in self.pending:
            self.readouts.add(key, name, fixed_readout(self.tables[name], seg))
        self.pending.clear()
        if self.state_buffers is not None:
            for layer, capture in self.pending_states.items():
                self.copies.start(layer, self.state_buffers.gather(layer, capture.rows), capture.parts)
            self.pending_states = {}
        got = self.copies.deliver(self.readouts, wait_for)
        if got:  # rows that landed after their request left the runner: its entry must expire too
            live = {request.key for request in self.resolved.values()}
            for key in got - live:
                self.readouts.finish(key)

    def apply(self, loaded: LoadedSae | None, hidden: torch.Tensor, residual: torch.Tensor,
              layer: int | None = None) -> None:
        """The op at a layer: copy out the hidden states read at ``layer`` (None: another op at
        this layer does), then ``loaded``'s work (None: an exposed layer without an SAE)."""
        if self.graph_mode:  # the same kernels every step, on whatever the tables hold
            if layer is not None and self.state_buffers is not None:
                self.state_buffers.record(layer, hidden, residual)
            if loaded is None:
                return
            watch = self.watches.get(loaded.name)
            if watch is not None:  # before any edit: what the model computed
                watch.accumulate(hidden + residual, watch.live)
            steer_fixed_(hidden, residual, loaded.sae, self.tables[loaded.name])
            return
        step = self.step
        if step is None:
            return
        if layer in step.captures:  # before any edit at this layer
            rows = step.captures[layer].rows
            self.copies.start(layer, hidden[rows] + residual[rows], step.captures[layer].parts)
        if loaded is None:
            return
        watch = self.watches.get(loaded.name)
        start = time.perf_counter()
        if watch is not None:
            watch.accumulate(hidden[: step.tokens] + residual[: step.tokens], step.tokens)
            watch.publish(self.metrics)
        tables = self.tables.get(loaded.name)
        if tables is not None and tables.filled:
            steer_fixed_(hidden, residual, loaded.sae, tables)
        for index, acts in apply_plan_split_(hidden, residual, loaded.sae, step.segments[loaded.name]).items():
            if step.keys[index] is not None:
                self.readouts.add(step.keys[index], loaded.name, acts)
        if self.monitoring:
            self.metrics.hook_seconds.labels(loaded.name).observe(time.perf_counter() - start)

    def stop_aborted(self, out: Any) -> Any:
        """A sampler's output (a dataclass with ``sampled_token_ids``, rows in batch order; V1's and
        V2's alike) with ``force_stops`` applied; itself when no abort rule runs this step."""
        if not self.aborts or self.stop_token is None:
            return out
        return replace(out, sampled_token_ids=self.force_stops(out.sampled_token_ids))

    def force_stops(self, sampled: torch.Tensor) -> torch.Tensor:
        """The step's sampled tokens (rows in batch order), with the stop token for every request
        whose abort rule has fired: vLLM's own stop check then ends it. No host sync."""
        if not self.aborts or self.stop_token is None:
            return sampled
        device, n = sampled.device, sampled.shape[0]
        rows = torch.tensor([row for row, states in self.aborts for _ in states], device=device)
        slots = [state.slot for _, states in self.aborts for state in states]
        fired = self.guard_table.fired[slots].ge(0).to(device).long()
        stop = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, rows, fired) > 0
        return torch.where(stop.view(-1, *[1] * (sampled.dim() - 1)), self.stop_token, sampled)

    def pop_readouts(self, keys: list[str]) -> dict[str, WorkerReply]:
        """Each key's readouts and error, removed from the worker."""
        self.collect_readouts(wait_for=keys)
        out = {key: self.readouts.pop(key) for key in keys}
        self.readouts.expire()
        self.metrics.readout_bytes.set(self.readouts.nbytes)
        return out
