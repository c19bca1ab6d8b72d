"""The reference engine on the real default model (SmolLM2-135M-Instruct) with an SAE built in code."""

import pytest
import torch

from sae_serve.engines.hf import HFEngine
from sae_serve.errors import SaeMismatchError
from sae_serve.sae.registry import registry_of
from sae_serve.steering.spec import RequestSpec, resolve
from tests.conftest import DEFAULT_D_MODEL, make_sae

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def add(a, b):",
    "My favourite colour is",
    "The best way to learn a language is",
]


@pytest.fixture(scope="module")
def engine(hf_model) -> HFEngine:
    model, tokenizer = hf_model
    sae = make_sae("relu", DEFAULT_D_MODEL, 512, seed=7, hook_layer=15)
    vector = torch.randn(DEFAULT_D_MODEL, generator=torch.Generator().manual_seed(2))
    registry = registry_of({"l15": sae}, vectors={"v": ("l15", vector / vector.norm())})
    return HFEngine(model, tokenizer, registry)


def spec(engine: HFEngine, interventions=(), vectors=(), positions="all", read=True):
    body = {"steering": {"interventions": [{"sae": "l15", **i} for i in interventions],
                         "vectors": list(vectors), "positions": positions}}
    if read:
        body["return_features"] = {"sae": "l15", "features": [1, 2, 3, 40, 41]}
    return resolve(RequestSpec.model_validate(body), engine.registry)


def mixed_specs(engine: HFEngine) -> list:
    return [
        None,
        spec(engine, [{"feature": 3, "mode": "clamp", "value": 300.0}]),
        spec(engine, [{"feature": 1, "mode": "scale", "value": 0.0}, {"feature": 2, "mode": "scale", "value": 0.0}]),
        spec(engine, [{"feature": 40, "mode": "add", "value": 250.0}]),
        spec(engine, vectors=[{"name": "v", "coefficient": 300.0}]),
    ]


def test_default_model_knows_paris(engine: HFEngine) -> None:
    [gen] = engine.generate(["The capital of France is"], max_new_tokens=3)
    assert gen.text.startswith(" Paris"), gen.text


def test_steering_changes_the_steered_and_only_them(engine: HFEngine) -> None:
    plain = engine.generate(PROMPTS, max_new_tokens=12)
    steered = engine.generate(PROMPTS, mixed_specs(engine), max_new_tokens=12)
    assert steered[0].token_ids == plain[0].token_ids
    for b in (1, 3, 4):
        assert steered[b].token_ids != plain[b].token_ids, (b, steered[b].text, plain[b].text)


def test_isolation_neighbours_do_not_matter(engine: HFEngine) -> None:
    """Same batch shape: each sequence's tokens and activations are bit-identical whether its
    neighbours steer or not."""
    specs = mixed_specs(engine)
    together = engine.generate(PROMPTS, specs, max_new_tokens=10)
    for i in range(len(PROMPTS)):
        alone = engine.generate(PROMPTS, [s if j == i else None for j, s in enumerate(specs)], max_new_tokens=10)
        assert alone[i].token_ids == together[i].token_ids
        if specs[i] is not None:
            assert torch.equal(alone[i].features.values, together[i].features.values)
            assert torch.equal(alone[i].features.positions, together[i].features.positions)


def test_batch_matches_solo_runs(engine: HFEngine) -> None:
    """Greedy tokens match each sequence's solo run; activations agree to float tolerance
    (padding changes matmul shapes, so only numerics may differ)."""
    specs = mixed_specs(engine)
    together = engine.generate(PROMPTS, specs, max_new_tokens=10)
    for i, prompt in enumerate(PROMPTS):
        [solo] = engine.generate([prompt], [specs[i]], max_new_tokens=10)
        assert solo.token_ids == together[i].token_ids, (i, solo.text, together[i].text)
        if specs[i] is not None:
            torch.testing.assert_close(solo.features.values, together[i].features.values, atol=2e-3, rtol=1e-3)


def test_readout_covers_every_fed_position(engine: HFEngine) -> None:
    req = spec(engine)
    [gen] = engine.generate([PROMPTS[1]], [req], max_new_tokens=6, stop_at_eos=False)
    n_prompt = len(gen.prompt_token_ids)
    assert gen.features.positions.tolist() == list(range(n_prompt + 5))
    assert gen.features.indices[0].tolist() == [1, 2, 3, 40, 41]
    assert (gen.features.values >= 0).all() and (gen.features.values > 0).any()


def test_generated_scope_leaves_the_prompt_alone(engine: HFEngine) -> None:
    req = spec(engine, [{"feature": 3, "mode": "clamp", "value": 300.0}], positions="generated")
    [plain] = engine.generate([PROMPTS[3]], max_new_tokens=8)
    [steered] = engine.generate([PROMPTS[3]], [req], max_new_tokens=8)
    assert steered.token_ids[0] == plain.token_ids[0]  # predicted from prompt positions only
    assert steered.token_ids != plain.token_ids


def test_logits_with_empty_spec_are_bit_identical(engine: HFEngine, hf_model) -> None:
    model, tokenizer = hf_model
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        raw = model(ids).logits[0]
    [hooked] = engine.logits([PROMPTS[0]], [spec(engine, read=False)])
    assert torch.equal(hooked, raw)
    [spliced] = engine.logits([PROMPTS[0]], splice_saes=["l15"])
    assert not torch.allclose(spliced, raw)


def test_sae_that_does_not_fit_refuses_to_load(hf_model) -> None:
    model, tokenizer = hf_model
    with pytest.raises(SaeMismatchError, match="d_in=64 but the model's hidden size is 576"):
        HFEngine(model, tokenizer, registry_of({"bad": make_sae("relu", 64, 128)}))
    with pytest.raises(SaeMismatchError, match="hook_layer=30 but the model has 30 layers"):
        HFEngine(model, tokenizer, registry_of({"bad": make_sae("relu", 576, 128, hook_layer=30)}))
