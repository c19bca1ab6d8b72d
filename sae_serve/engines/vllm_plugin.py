"""The vLLM general plugin: SAEs beside the model, steering and readout per request, every step.

``register()`` runs in every vLLM process. It patches the V1 model runner (the one CPU uses) so
that, after the model loads, the configured SAEs (vLLM's ``additional_config["sae_serve"]``, or
the file named by SAE_SERVE_CONFIG) are loaded in the model's dtype and device, checked against
it, and each SAE's decoder layer is wrapped so that its output passes through the custom op
``sae_serve::steer_``. The op is opaque to torch.compile, so the compiled model runs it every
step (a Python hook would be traced once and silently lost).

Before each forward, the runner's batch (request ids, query_start_loc, tokens already computed)
is turned into ``RequestRows``; each request's spec, read once from
``SamplingParams.extra_args["sae_serve"]``, is resolved and prepared once. When no request in the
step steers or reads, the op returns at once and touches nothing.

With ``op: {fixed_shapes: true}`` in the config, the steering itself runs through the fixed-shape
op (``steering/fixed.py``): persistent tables filled before the forward, the shapes CUDA graphs
need. Whenever the forward is replayed from CUDA graphs, every step runs that op and nothing
else (``graph_mode``): the V2 model runner that GPUs default to (patched in ``vllm_v2.py``), and
the V1 runner on a GPU unless ``enforce_eager``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from sae_serve.config import SaeServeConfig, config_from_env
from sae_serve.errors import SaeServeError, SpecError, field_path
from sae_serve.metrics import WorkerMetrics, worker_metrics
from sae_serve.sae.registry import LoadedSae, SaeRegistry, build_registry
from sae_serve.steering.fixed import Capacity, FixedTables, fits, fixed_readout, steer_fixed_
from sae_serve.steering.hook import FeatureActivations, apply_plan_split_
from sae_serve.steering.plan import RequestPlan, RequestRows, SaePlan, Segment, build_plan, prepare_all
from sae_serve.steering.spec import RequestSpec, resolve
from sae_serve.steering.watch import Watch

logger = logging.getLogger(__name__)
SPEC_KEY = "sae_serve"
"""extra_args field holding the request's spec (a JSON string or a dict)."""
REQUEST_KEY = "sae_serve_key"
"""extra_args field holding the caller's key for fetching the request's activations."""
MAX_PENDING_READOUTS = 4096
WORKER_METHOD = "sae_serve_pop_readouts"
"""The worker method ``collective_rpc`` calls by name to fetch readouts (works across processes)."""

# The compiled graph can carry only tensors and ints to the op, so the op finds its runtime
# through this process-local table, filled when a model is loaded.
_SITES: dict[int, tuple[SteeringRuntime, LoadedSae]] = {}


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


@dataclass
class _Step:
    plans: list[dict[str, RequestPlan]]  # per request: its prepared work by SAE name
    layout: list[RequestRows]
    keys: list[str | None]
    tokens: int  # real (unpadded) rows in the step
    segments: dict[str, SaePlan]  # per SAE: the work of the segment path (the fixed op's is in its tables)


@dataclass
class SteeringRuntime:
    """Per-worker state: the SAEs, each live request's resolved spec, readouts not yet fetched."""

    registry: SaeRegistry
    resolved: dict[str, tuple[str | None, dict[str, RequestPlan]]] = field(default_factory=dict)
    readouts: OrderedDict[str, dict[str, list[FeatureActivations]]] = field(default_factory=OrderedDict)
    errors: dict[str, str] = field(default_factory=dict)
    step: _Step | None = None
    metrics: WorkerMetrics | None = None
    watches: dict[str, Watch] = field(default_factory=dict)
    tables: dict[str, FixedTables] = field(default_factory=dict)  # SAE name -> the fixed op's tables
    graph_mode: bool = False  # CUDA graphs: the op runs the fixed tables only, every step
    pending: list[tuple[str, str, Segment]] = field(default_factory=list)  # fixed-op readouts to collect

    def __post_init__(self) -> None:
        self.saes = {name: loaded.sae for name, loaded in self.registry.saes.items()}

    def enable_metrics(self, metrics: WorkerMetrics, firing_fraction: float, max_rows: int) -> None:
        """Watch each SAE's watchlist on every token (``max_rows``: the most rows in a step)."""
        self.metrics = metrics
        for name, loaded in self.registry.saes.items():
            if not loaded.watchlist or loaded.sae.cfg.architecture == "topk":
                continue
            catalog = loaded.catalog
            self.watches[name] = Watch(
                loaded.sae, name, list(loaded.watchlist), [catalog.label_of(f) or str(f) for f in loaded.watchlist],
                [firing_fraction * (catalog.info(f).max_activation or 0.0) for f in loaded.watchlist], max_rows)

    def _resolve(self, req_id: str, extra_args: dict[str, Any] | None) -> tuple[str | None, dict[str, RequestPlan]]:
        if req_id not in self.resolved:
            args = extra_args or {}
            key, raw = args.get(REQUEST_KEY), args.get(SPEC_KEY)
            request = None
            if raw is not None:
                try:
                    spec = RequestSpec.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
                    request = resolve(spec, self.registry)
                except (ValidationError, SpecError, ValueError) as exc:
                    # Clients validate before submitting; reaching here is a bug, never a crash.
                    logger.error("request %s: invalid sae_serve spec, not steered: %s", req_id, exc)
                    self.errors[str(key or req_id)] = str(exc)
            self.resolved[req_id] = (key, prepare_all(request, self.saes))
        return self.resolved[req_id]

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
        nobody steers or reads. ``live``: the ids of the runner's current requests."""
        self.collect_fixed_readouts()
        if self.graph_mode:  # inside graphs the op adds to the totals; publish what has landed
            for watch in self.watches.values():
                watch.publish(self.metrics)
                watch.set_live(batch.query_start_loc[-1])
        for gone in set(self.resolved) - set(live):
            del self.resolved[gone]
        resolved = [self._resolve(rid, extra_args.get(rid)) for rid in batch.req_ids]
        plans, keys = [p for _, p in resolved], [k for k, _ in resolved]
        self.step = None
        if batch.req_ids and (self.metrics is not None or any(plans)):
            layout = batch.layout()
            self.step = _Step(plans, layout, keys, batch.query_start_loc[-1], {})
            for name in self.saes:
                self.step.segments[name] = self._split(name, build_plan([p.get(name) for p in plans], layout), keys)
        elif self.graph_mode:
            for tables in self.tables.values():
                tables.fill(())

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
            for seg in rest:
                self.errors[str(keys[seg.request])] = (f"SAE {name!r}: this request needs the segment path (top-k "
                                                       "readout or too many features), which CUDA graphs cannot run")
            rest = []
        tables.fill(fixed)
        self.pending += [(key, name, seg) for seg in fixed if seg.plan.reads and (key := keys[seg.request])]
        return tuple(rest)

    def collect_fixed_readouts(self) -> None:
        """Readouts the fixed op wrote during the last forward."""
        for key, name, seg in self.pending:
            self._store(key, name, fixed_readout(self.tables[name], seg))
        self.pending.clear()

    def _store(self, key: str, sae: str, acts: FeatureActivations) -> None:
        self.readouts.setdefault(key, {}).setdefault(sae, []).append(acts)
        self.readouts.move_to_end(key)
        while len(self.readouts) > MAX_PENDING_READOUTS:  # never fetched: drop the oldest
            self.readouts.popitem(last=False)

    def apply(self, loaded: LoadedSae, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        watch = self.watches.get(loaded.name)
        if self.graph_mode:  # the same kernels every step, on whatever the tables hold
            if watch is not None:  # before any edit: what the model computed
                watch.accumulate(hidden + residual, watch.live)
            steer_fixed_(hidden, residual, loaded.sae, self.tables[loaded.name])
            return
        step = self.step
        if step is None:
            return
        start = time.perf_counter()
        if watch is not None and self.metrics is not None:
            watch.accumulate(hidden[: step.tokens] + residual[: step.tokens], step.tokens)
            watch.publish(self.metrics)
        tables = self.tables.get(loaded.name)
        if tables is not None and tables.filled:
            steer_fixed_(hidden, residual, loaded.sae, tables)
        for index, acts in apply_plan_split_(hidden, residual, loaded.sae, step.segments[loaded.name]).items():
            if step.keys[index] is not None:
                self._store(step.keys[index], loaded.name, acts)
        if self.metrics is not None:
            self.metrics.hook_seconds.labels(loaded.name).observe(time.perf_counter() - start)

    def pop_readouts(self, keys: list[str]) -> dict[str, Any]:
        """Readouts of ``keys`` as plain lists (they cross process boundaries), and errors."""
        self.collect_fixed_readouts()
        out: dict[str, Any] = {}
        for key in keys:
            by_sae = self.readouts.pop(key, {})
            out[key] = {"error": self.errors.pop(key, None), "features": {
                sae: {"positions": torch.cat([c.positions for c in chunks]).tolist(),
                      "indices": torch.cat([c.indices for c in chunks]).tolist(),
                      "values": torch.cat([c.values for c in chunks]).tolist()}
                for sae, chunks in by_sae.items()}}
        return out


# --- the custom op -------------------------------------------------------------------------------
@torch.library.custom_op("sae_serve::steer_", mutates_args=("hidden",))
def steer_(hidden: torch.Tensor, residual: torch.Tensor, site: int) -> None:
    """Edit ``hidden`` in place for the current step (the stream is hidden + residual)."""
    runtime, loaded = _SITES[site]
    runtime.apply(loaded, hidden, residual)


@steer_.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor, site: int) -> None:
    return None


class SteeredDecoderLayer(nn.Module):
    """A vLLM decoder layer followed by the steering op on its output (resid_post)."""

    def __init__(self, layer: nn.Module, site: int) -> None:
        super().__init__()
        self.layer = layer
        self.site = site

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = self.layer(positions, hidden_states, residual, **kwargs)
        torch.ops.sae_serve.steer_(hidden_states, residual, self.site)
        return hidden_states, residual


def _site_layer(loaded: LoadedSae) -> int:
    """The decoder layer whose output is the SAE's site (resid_pre of L is resid_post of L-1)."""
    sae = loaded.sae
    if sae.hook_point == "resid_post":
        return sae.hook_layer
    if sae.hook_layer == 0:
        raise SaeServeError(f"SAE {loaded.name!r}: resid_pre of layer 0 (the embeddings) is not supported")
    return sae.hook_layer - 1


def runner_config(runner: Any) -> SaeServeConfig | None:
    """vLLM's ``additional_config["sae_serve"]`` if given, else the file in SAE_SERVE_CONFIG."""
    extra = getattr(runner.vllm_config, "additional_config", None) or {}
    if "sae_serve" not in extra:
        return config_from_env()
    try:
        return SaeServeConfig.model_validate(extra["sae_serve"])
    except ValidationError as exc:
        raise SaeServeError(f"additional_config.sae_serve: {exc.errors()[0]['msg']} "
                            f"at {field_path(exc.errors()[0]['loc'])}") from None


def bind_site(runtime: SteeringRuntime, loaded: LoadedSae) -> int:
    """The id the op is called with to steer ``loaded`` through ``runtime``."""
    site = id(loaded)
    _SITES[site] = (runtime, loaded)
    return site


def replays_cuda_graphs(runner: Any) -> bool:
    """Whether the runner captures the forward in CUDA graphs (vLLM's default on GPUs unless
    enforce_eager). Piecewise graphs capture the op too (it is not one of vLLM's splitting ops),
    so the op's Python runs at capture only and the segment path would be silently skipped."""
    mode = getattr(runner.vllm_config.compilation_config, "cudagraph_mode", None)
    return torch.device(runner.device).type == "cuda" and mode is not None and mode.name != "NONE"


def attach(runner: Any, graph_mode: bool = False) -> SteeringRuntime | None:
    """Load the configured SAEs beside ``runner.model`` and wrap their layers. ``graph_mode`` (the
    V2 runner, or the V1 runner replaying CUDA graphs): every SAE runs on the fixed-shape op,
    every step."""
    config = runner_config(runner)
    if config is None or not config.saes:
        return None
    graph_mode = graph_mode or replays_cuda_graphs(runner)
    hf = runner.model_config.hf_config
    registry = build_registry(config, dtype=runner.model_config.dtype, device=runner.device)
    registry.check_fits(hf.hidden_size, hf.num_hidden_layers)
    runtime = SteeringRuntime(registry, graph_mode=graph_mode)
    sched = runner.vllm_config.scheduler_config
    if config.metrics.enabled:
        runtime.enable_metrics(worker_metrics(), config.metrics.firing_fraction_of_max, sched.max_num_batched_tokens)
    if config.op.fixed_shapes or graph_mode:
        capacity = Capacity(sched.max_num_batched_tokens, config.op.slots, sched.max_num_seqs)
        topk = [name for name, loaded in registry.saes.items() if loaded.sae.cfg.architecture == "topk"]
        if graph_mode and topk:
            raise SaeServeError(f"SAE {topk[0]!r} is TopK, which needs the full encode: CUDA graphs cannot run "
                                "it; use VLLM_USE_V2_MODEL_RUNNER=0 with enforce_eager=True, or a relu/jumprelu SAE")
        runtime.tables = {name: FixedTables(loaded.sae, capacity) for name, loaded in registry.saes.items()
                          if name not in topk}
    layers = runner.model.model.layers
    for loaded in registry.saes.values():
        index = _site_layer(loaded)
        layers[index] = SteeredDecoderLayer(layers[index], bind_site(runtime, loaded))
        logger.info("sae_serve: SAE %r (%d features) on layer %d", loaded.name, loaded.sae.d_sae, index)
    return runtime


def _runner_classes() -> list[type]:
    """The V1 runner, and its CPU subclass where this vLLM build has one (it overrides load_model)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:
        return [GPUModelRunner]
    return [GPUModelRunner, CPUModelRunner]


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    if getattr(GPUModelRunner, "_sae_serve_patched", False):
        return

    def wrap_load(original):  # type: ignore[no-untyped-def]
        def load_model(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            original(self, *args, **kwargs)
            self._sae_serve = attach(self)
        return load_model

    original_forward = GPUModelRunner._model_forward

    def _model_forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        runtime = getattr(self, "_sae_serve", None)
        if runtime is None:
            return original_forward(self, *args, **kwargs)
        runtime.begin_step(self)
        try:
            return original_forward(self, *args, **kwargs)
        finally:
            runtime.step = None

    WorkerBase.sae_serve_pop_readouts = pop_readouts
    for cls in _runner_classes():
        if "load_model" in cls.__dict__:
            cls.load_model = wrap_load(cls.__dict__["load_model"])
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._sae_serve_patched = True


def register() -> None:
    """The ``vllm.general_plugins`` entry point; safe to call again in any process."""
    from sae_serve.engines.vllm_v2 import patch_v2_runner

    try:
        _patch_runner()
        patch_v2_runner()
    except ImportError as exc:  # a vLLM without the V1 runner: say so, do not half-load
        raise SaeServeError(f"sae_serve needs vLLM's V1 model runner: {exc}") from exc


def pop_readouts(worker: Any, keys: list[str]) -> dict[str, Any]:
    """A worker's readouts for ``keys`` (removed from the worker); installed on vLLM's workers as
    ``WORKER_METHOD`` so that ``collective_rpc(WORKER_METHOD, args=(keys,))`` reaches it."""
    runtime = getattr(worker.model_runner, "_sae_serve", None)
    return runtime.pop_readouts(keys) if runtime else {k: {"error": None, "features": {}} for k in keys}
