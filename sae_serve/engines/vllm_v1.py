"""The plugin on vLLM's V1 model runner (the one CPU uses, and GPUs with VLLM_USE_V2_MODEL_RUNNER=0).

After the model loads, ``attach`` loads the SAEs beside it; before each forward, the runner's batch
(request ids, query_start_loc, tokens already computed) goes to the runtime's ``plan_step``; after
each sampling, requests a guardrail aborted get the stop token (``force_stops``).
"""

from __future__ import annotations

from typing import Any

from sae_serve.engines.vllm_runtime import SteeringRuntime
from sae_serve.engines.vllm_site import attach


def _runner_classes() -> list[type]:
    """The V1 runner, and its CPU subclass where this vLLM build has one (it overrides load_model)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:
        return [GPUModelRunner]
    return [GPUModelRunner, CPUModelRunner]


def stop_aborted_requests(sampler: Any, runtime: SteeringRuntime) -> None:
    """After each sampling, requests whose abort guardrail fired get the stop token instead."""
    sample = sampler.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return runtime.stop_aborted(sample(*args, **kwargs))

    sampler.forward = forward


def patch_v1_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_sae_serve_patched", False):
        return

    def wrap_load(original):  # type: ignore[no-untyped-def]
        def load_model(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            original(self, *args, **kwargs)
            self._sae_serve = attach(self)
            if self._sae_serve is not None:
                stop_aborted_requests(self.sampler, self._sae_serve)
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

    for cls in _runner_classes():
        if "load_model" in cls.__dict__:
            cls.load_model = wrap_load(cls.__dict__["load_model"])
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._sae_serve_patched = True
