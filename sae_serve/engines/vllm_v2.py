"""The plugin on vLLM's V2 model runner, the one GPUs use by default.

V2 has no per-step hook around the forward, and it replays CUDA graphs, in which Python in the
op never runs. So, after the model loads:
- the runner's ModelState (vLLM's extension point) is wrapped: ``add_request`` and
  ``remove_request`` keep each request's extra_args and prompt length, and ``prepare_inputs``,
  called before every forward, graph replays included, maps the batch to rows and fills the
  fixed-shape op's tables (``steering/fixed.py``);
- the runtime runs in ``graph_mode``: the op runs the tables' kernels every step, so a captured
  graph replays the steering (and guardrails) of whatever requests the next step holds;
- ``sample`` is wrapped so that requests a guardrail aborted get the stop token.
What needs variable shapes cannot run here: a TopK SAE refuses to load on this path, and the
servers refuse a request asking for a top-k readout or more features than ``op.slots`` up front
(they learn at startup that the workers replay graphs); should one arrive anyway it is not
steered and its reply carries the error, which the servers answer as a failure.
vLLM runs dummy batches through ``prepare_inputs`` too (profile, warm-up, graph capture), whose
request ids never went through ``add_request``: they are plain requests with no prompt. The watched features are
totalled inside the graph too (``steering/watch.py``). The tables are written with copies on the
current CUDA stream, the one vLLM 0.32's V2 runner calls ``prepare_inputs`` on right before the
forward (read from its code), so they land after the previous step's kernels and before this
step's. ``tests/engines/test_cuda_graphs.py`` replays the op in a real CUDA graph on a GPU; the
whole runner needs vLLM on a GPU (``bench/gpu_check.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sae_serve.engines.vllm_runtime import SteeringRuntime, StepBatch
from sae_serve.engines.vllm_site import attach


def step_batch(input_batch: Any, prompt_lens: dict[str, int]) -> StepBatch:
    """The V2 runner's InputBatch (batch order, unpadded) as the runtime's StepBatch; requests
    it never added (dummy batches) have no prompt."""
    n = input_batch.num_reqs
    req_ids = list(input_batch.req_ids[:n])
    return StepBatch(req_ids, [int(q) for q in input_batch.query_start_loc_np[: n + 1]],
                     [int(c) for c in input_batch.num_computed_tokens_np[:n]], [prompt_lens.get(r, 0) for r in req_ids])


def prompt_len(new_req_data: Any) -> int:
    """vLLM's own count (token ids, or the rows of prompt embeddings)."""
    if hasattr(new_req_data, "prompt_len"):
        return int(new_req_data.prompt_len)
    embeds = getattr(new_req_data, "prompt_embeds", None)
    return len(new_req_data.prompt_token_ids) if new_req_data.prompt_token_ids is not None else (
        0 if embeds is None else int(embeds.shape[0]))


class SteeringModelState:
    """vLLM's own ModelState, plus the bookkeeping the steering runtime needs. Every other
    attribute, read or written (vLLM resets some on the state), is vLLM's state's."""

    _OWN = frozenset({"_inner", "_runtime", "_extra_args", "_prompt_lens"})

    def __init__(self, inner: Any, runtime: SteeringRuntime) -> None:
        self._inner = inner
        self._runtime = runtime
        self._extra_args: dict[str, dict[str, Any] | None] = {}
        self._prompt_lens: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        params = new_req_data.sampling_params
        self._extra_args[new_req_data.req_id] = params.extra_args if params is not None else None
        self._prompt_lens[new_req_data.req_id] = prompt_len(new_req_data)
        self._inner.add_request(req_index, new_req_data)

    def remove_request(self, req_id: str) -> None:
        self._extra_args.pop(req_id, None)
        self._prompt_lens.pop(req_id, None)
        self._inner.remove_request(req_id)

    def prepare_inputs(self, input_batch: Any, req_states: Any) -> dict[str, Any]:
        self._runtime.plan_step(step_batch(input_batch, self._prompt_lens), self._extra_args, self._extra_args)
        return self._inner.prepare_inputs(input_batch, req_states)


def stop_aborted_requests(sample: Callable[..., tuple[Any, Any, Any]]) -> Callable[..., tuple[Any, Any, Any]]:
    """V2's ``sample`` (after any gather across ranks, so rows are in the batch's order, the order
    ``prepare_inputs`` planned), with the stop token for every request whose abort rule has fired:
    vLLM's own stop check then ends it. No host sync."""

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        out, num_sampled, num_rejected = sample(self, *args, **kwargs)
        runtime = getattr(self, "_sae_serve", None)
        return (out if runtime is None else runtime.stop_aborted(out)), num_sampled, num_rejected

    return wrapped


def patch_v2_runner() -> None:
    """Wrap the V2 runner's load_model; a vLLM without the V2 runner is left alone."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except ImportError:
        return
    if getattr(V2Runner, "_sae_serve_patched", False):
        return
    original = V2Runner.load_model

    def load_model(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        self._sae_serve = attach(self, graph_mode=True)
        if self._sae_serve is not None:
            self.model_state = SteeringModelState(self.model_state, self._sae_serve)

    V2Runner.load_model = load_model
    V2Runner.sample = stop_aborted_requests(V2Runner.sample)
    V2Runner._sae_serve_patched = True
