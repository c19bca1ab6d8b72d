"""The serving policy, through the service layer that HTTP and gRPC share."""

import pytest
import torch

from sae_serve.config import SaeServeConfig, write_config
from sae_serve.errors import PolicyError, SpecError
from sae_serve.sae.features import FeatureCatalog, FeatureInfo
from sae_serve.sae.formats import save_sae
from sae_serve.sae.registry import SaeEntry, VectorEntry, save_vector
from sae_serve.server.service import SteeringService
from sae_serve.steering.policy import FeatureSelector, Policy
from sae_serve.steering.spec import RequestSpec
from tests.conftest import make_sae


@pytest.fixture
def config_for(tmp_path):
    save_sae(make_sae("relu", 16, 64), tmp_path / "s")
    FeatureCatalog(d_sae=64, features={1: FeatureInfo(label="french", tags=("language",), max_activation=2.0),
                                       2: FeatureInfo(label="deception", tags=("safety",), max_activation=3.0)}
                   ).save(tmp_path / "s")
    save_vector(torch.ones(16), tmp_path / "v.safetensors")

    def make(policy: Policy) -> SteeringService:
        config = SaeServeConfig(saes=(SaeEntry(name="l1", path=str(tmp_path / "s")),),
                                vectors=(VectorEntry(name="v", sae="l1", path=str(tmp_path / "v.safetensors")),),
                                policy=policy)
        return SteeringService(config)
    return make


def steer(feature, **strength) -> RequestSpec:
    return RequestSpec.model_validate({"steering": {"interventions": [
        {"sae": "l1", "feature": feature, "mode": "clamp", **strength}]}})


def refused(service: SteeringService, spec: RequestSpec) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        service.prepare(spec)
    return info.value


def test_default_policy_allows_within_bounds(config_for) -> None:
    service = config_for(Policy())
    assert service.prepare(steer("french", multiple_of_max=10)).applied[0].value == 20.0
    err = refused(service, steer("french", multiple_of_max=50))
    assert (err.field, err.forbidden) == ("steering.interventions[0].multiple_of_max", False)


def test_steerable_features_by_tag_and_label(config_for) -> None:
    service = config_for(Policy(steerable={"l1": FeatureSelector(tags=("language",), features=(7,))}))
    service.prepare(steer("french", value=1.0))
    service.prepare(steer(7, value=1.0))
    err = refused(service, steer("deception", value=1.0))
    assert (err.field, err.forbidden) == ("steering.interventions[0].feature", True)
    assert "may not be steered" in str(err)


def test_limits_and_vectors(config_for) -> None:
    service = config_for(Policy(max_abs_value=5, max_abs_vector_coefficient=2, allow_vectors=True))
    assert refused(service, steer(3, value=-6.0)).field == "steering.interventions[0].value"
    spec = RequestSpec.model_validate({"steering": {"vectors": [{"name": "v", "coefficient": 3}]}})
    assert refused(service, spec).field == "steering.vectors[0].coefficient"
    twice = RequestSpec.model_validate({"steering": {"vectors": [{"name": "v", "coefficient": 2}] * 2}})
    with pytest.raises(SpecError) as info:  # 2 + 2 would get past a limit of 2
        service.prepare(twice)
    assert info.value.field == "steering.vectors[1].name"
    no_vectors = config_for(Policy(allow_vectors=False))
    err = refused(no_vectors, RequestSpec.model_validate({"steering": {"vectors": [{"name": "v", "coefficient": 1}]}}))
    assert (err.field, err.forbidden) == ("steering.vectors", True)


def test_readout_rules(config_for) -> None:
    closed = config_for(Policy(allow_readout=False))
    err = refused(closed, RequestSpec.model_validate({"return_features": {"sae": "l1", "top_k": 3}}))
    assert (err.field, err.forbidden) == ("return_features", True)
    listed = config_for(Policy(readable={"l1": FeatureSelector(tags=("safety",))}))
    assert listed.prepare(RequestSpec.model_validate({"return_features": {"sae": "l1", "features": ["deception"]}}))
    assert refused(listed, RequestSpec.model_validate({"return_features": {"sae": "l1", "top_k": 3}})).field == \
        "return_features.top_k"
    err = refused(listed, RequestSpec.model_validate({"return_features": {"sae": "l1", "features": [2, 1]}}))
    assert err.field == "return_features.features[1]"


def test_policy_in_the_config_file(tmp_path, config_for) -> None:
    from sae_serve.config import load_config
    from sae_serve.errors import SaeFormatError

    service = config_for(Policy(max_abs_value=3))
    path = write_config(SaeServeConfig(saes=tuple(
        SaeEntry(name=n, path=str(tmp_path / "s")) for n in service.registry.saes), policy=Policy(max_abs_value=3)),
        tmp_path / "c.json")
    assert load_config(path).policy.max_abs_value == 3
    path.write_text('{"policy": {"max_abs_value": -1}}')
    with pytest.raises(SaeFormatError, match="field policy.max_abs_value"):
        load_config(path)


def _service(tmp_path, capabilities, **config) -> SteeringService:
    from sae_serve.engines.protocol import WorkerCapabilities

    save_sae(make_sae("relu", 16, 64), tmp_path / "s")
    return SteeringService(SaeServeConfig(saes=(SaeEntry(name="l1", path=str(tmp_path / "s")),), **config),
                           capabilities=WorkerCapabilities(*capabilities) if isinstance(capabilities, tuple)
                           else WorkerCapabilities(**capabilities))


def test_what_cuda_graphs_cannot_run_is_refused_naming_the_field(tmp_path) -> None:
    from sae_serve.config import load_config
    from sae_serve.errors import SaeFormatError, SpecError

    service = _service(tmp_path, (True, 2, 1024))  # graph mode, 2 slots
    two = {"steering": {"interventions": [{"sae": "l1", "feature": f, "mode": "add", "value": 1.0} for f in (1, 2)]}}
    assert service.prepare(RequestSpec.model_validate(two)) is not None
    three = {**two, "return_features": {"sae": "l1", "features": [3]}}  # edits and reads share the slots
    with pytest.raises(SpecError) as info:
        service.prepare(RequestSpec.model_validate(three))
    assert info.value.field == "steering.interventions" and "capacity of 2" in str(info.value)
    with pytest.raises(SpecError) as info:
        service.prepare(RequestSpec.model_validate({"return_features": {"sae": "l1", "top_k": 2}}))
    assert info.value.field == "return_features.top_k" and "CUDA graphs" in str(info.value)
    assert service.metrics.refused.labels("capacity")._value.get() >= 2
    eager = _service(tmp_path, (False, 2, 1024))  # without graphs the segment path runs the rest
    assert eager.prepare(RequestSpec.model_validate(three)) is not None
    (tmp_path / "bad.json").write_text('{"op": {"fixed_shapes": true, "slots": 0}}')
    with pytest.raises(SaeFormatError, match="field op.slots"):
        load_config(tmp_path / "bad.json")


def test_guardrails_under_cuda_graphs_fit_the_lanes_or_are_refused_naming_the_field(tmp_path) -> None:
    from sae_serve.errors import SpecError

    def rules(*specs: tuple[str, int, dict]) -> RequestSpec:
        return RequestSpec.model_validate({"guardrails": [
            {"name": f"r{i}", "action": action, "when": {"sae": "l1", "feature": f, "above": {"value": 1.0}}, **extra}
            for i, (action, f, extra) in enumerate(specs)]})

    clamp = {"steering": {"interventions": [{"sae": "l1", "feature": 9, "mode": "clamp", "value": 2.0}]}}
    graphs = {"graph_mode": True, "slots": 3, "max_model_len": 1024, "stop_token": 2, "lanes": 2}
    service = _service(tmp_path, graphs)
    assert service.prepare(rules(("flag", 1, {}), ("steer", 2, clamp))) is not None  # 3 features, 2 lanes
    refused = [(rules(("flag", 1, {}), ("flag", 2, {}), ("flag", 3, {})), "op.guard_lanes"),
               (rules(("flag", 1, {}), ("steer", 2, {"steering": {"interventions": [
                   {"sae": "l1", "feature": f, "mode": "add", "value": 1.0} for f in (5, 6)]}})), "op.slots")]
    for spec, why in refused:
        with pytest.raises(SpecError, match=why) as info:
            service.prepare(spec)
        assert info.value.field.startswith("guardrails"), info.value.field
    assert service.prepare(rules(("abort", 1, {}))) is not None
    with pytest.raises(SpecError, match="op.guard_lanes > 0"):
        _service(tmp_path, {**graphs, "lanes": 0}).prepare(rules(("flag", 1, {})))


def test_readouts_are_bounded_up_front_and_one_per_request(tmp_path) -> None:
    from sae_serve.config import LimitsConfig
    from sae_serve.errors import SpecError

    service = _service(tmp_path, (False, 16, 1000), limits=LimitsConfig(max_readout_values=8000))
    assert service.prepare(RequestSpec.model_validate({"return_features": {"sae": "l1", "top_k": 8}}))
    with pytest.raises(SpecError) as info:  # 9 per token x 1000 tokens > 8000
        service.prepare(RequestSpec.model_validate({"return_features": {"sae": "l1", "top_k": 9}}))
    assert info.value.field == "return_features.top_k" and "limit of 8000" in str(info.value)
    with pytest.raises(SpecError) as info:
        service.prepare(RequestSpec.model_validate({"return_features": {"sae": "l1", "features": list(range(9))}}))
    assert info.value.field == "return_features.features"
    read = RequestSpec.model_validate({"return_features": {"sae": "l1", "top_k": 2}})
    with pytest.raises(SpecError) as info:  # prompt_embeds beside other prompts do not split (fan_out.py)
        service.prepare(read, fan_out={"prompt_embeds": 2, "use_beam_search": 0})
    assert info.value.field == "prompt_embeds"
    prepared = service.prepare(read, fan_out={"prompt_embeds": 1, "use_beam_search": 0})
    each = service.admit_sequences(prepared, 3, None)  # n=3: three sequences, three readouts
    assert each[0] is prepared and len({p.engine.key for p in each}) == 3
    assert len({p.engine.cache_salt for p in each}) == 3  # each reads its own prompt computed
    assert {p.engine.spec_json for p in each} == {prepared.engine.spec_json}
    steer = RequestSpec.model_validate(
        {"steering": {"interventions": [{"sae": "l1", "feature": 1, "mode": "add", "value": 1.0}]}})
    assert service.prepare(steer, fan_out={"prompt_embeds": 3}) is not None  # each sequence is steered
    with pytest.raises(SpecError) as info:  # vLLM's beam search drops the request's extra_args
        service.prepare(steer, fan_out={"use_beam_search": 1})
    assert info.value.field == "use_beam_search"


def guarded(action: str, when: dict, **extra) -> RequestSpec:
    return RequestSpec.model_validate({"guardrails": [{"name": "g", "when": when, "action": action, **extra}]})


def test_guardrails_are_checked_like_reads_and_steering(config_for) -> None:
    service = config_for(Policy(readable={"l1": FeatureSelector(tags=("language",))}, guardrail_actions=("flag",
                                                                                                          "steer"),
                                max_abs_multiple_of_max=4))
    french = {"sae": "l1", "feature": "french", "above": {"multiple_of_max": 0.5}}
    prepared = service.prepare(guarded("flag", french))
    assert prepared is not None and prepared.guarded and not prepared.aborts
    err = refused(service, guarded("abort", french))
    assert (err.field, err.forbidden) == ("guardrails[0].action", True)
    err = refused(service, guarded("flag", {**french, "feature": "deception"}))  # an unreadable trigger
    assert (err.field, err.forbidden) == ("guardrails[0].when.feature", True)
    too_hard = {"interventions": [{"sae": "l1", "feature": "french", "mode": "clamp", "multiple_of_max": 9}]}
    err = refused(service, guarded("steer", french, steering=too_hard))
    assert (err.field, err.forbidden) == ("guardrails[0].steering.interventions[0].multiple_of_max", False)


def test_the_servers_own_guardrails_join_every_request_and_a_bad_one_stops_the_server(config_for, tmp_path) -> None:
    from sae_serve.errors import SaeServeError
    from sae_serve.steering.spec import Guardrail

    rule = Guardrail.model_validate({"name": "no-deception", "action": "abort", "when": {
        "sae": "l1", "feature": "deception", "above": {"multiple_of_max": 0.5}}})
    service = config_for(Policy(guardrail_actions=()))
    service.server_guardrails = [rule]
    plain = service.prepare(RequestSpec())
    assert plain is not None and plain.aborts and not plain.asked  # admitted only for the server's rule
    assert '"server_guardrails":[{"name":"no-deception"' in plain.engine.spec_json
    bad = rule.model_copy(update={"when": rule.when.model_copy(update={"feature": "nope"})})
    with pytest.raises(SaeServeError, match=r"config guardrails: server_guardrails\[0\].when.feature"):
        SteeringService(SaeServeConfig(saes=(SaeEntry(name="l1", path=str(tmp_path / "s")),), guardrails=(bad,)))


def test_a_request_cannot_stack_edits_nor_steer_before_the_servers_triggers(tmp_path) -> None:
    from sae_serve.sae.registry import registry_of
    from sae_serve.steering.spec import Guardrail, resolve

    registry = registry_of({"early": make_sae("relu", 16, 64, hook_layer=0),
                            "late": make_sae("relu", 16, 64, seed=1)})
    add = {"interventions": [{"sae": "late", "feature": 3, "mode": "add", "value": 9}]}
    twice = {"steering": add, "guardrails": [{"name": "g", "action": "steer", "steering": add,
                                              "when": {"sae": "late", "feature": 1, "above": {"value": 0}}}]}
    with pytest.raises(SpecError, match="already edited by this request") as info:
        resolve(RequestSpec.model_validate(twice), registry)
    assert info.value.field == "guardrails[0].steering.interventions[0].feature"

    save_sae(registry.saes["early"].sae, tmp_path / "early")
    save_sae(registry.saes["late"].sae, tmp_path / "late")
    service = SteeringService(SaeServeConfig(saes=(SaeEntry(name="early", path=str(tmp_path / "early")),
                                                   SaeEntry(name="late", path=str(tmp_path / "late")))))
    service.server_guardrails = [Guardrail.model_validate({"name": "watch", "action": "flag", "when": {
        "sae": "late", "feature": 1, "above": {"value": 5}}})]
    upstream = RequestSpec.model_validate({"steering": {"interventions": [
        {"sae": "early", "feature": 3, "mode": "add", "value": 9}]}})
    err = refused(service, upstream)  # it would change what the server's trigger at layer 1 reads
    assert (err.field, err.forbidden) == ("steering", True)
    assert service.prepare(RequestSpec.model_validate({"steering": {"interventions": [
        {"sae": "late", "feature": 3, "mode": "add", "value": 9}]}})) is not None  # at the trigger's SAE: fine


def test_the_config_refuses_a_server_wide_steer_rule() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="a server-wide guardrail aborts or flags"):
        SaeServeConfig.model_validate({"guardrails": [{"name": "s", "action": "steer", "when": {
            "sae": "l1", "feature": 1, "above": {"value": 1}}, "steering": {"interventions": []}}]})


def test_hidden_states_only_at_the_layers_the_policy_lets_clients_read(config_for) -> None:
    spec = RequestSpec.model_validate({"return_hidden_states": {"layers": [1, 3]}})
    assert config_for(Policy()).prepare(spec).reads_states  # (the workers say which layers exist)
    err = refused(config_for(Policy(hidden_state_layers=(1,))), spec)
    assert (err.field, err.forbidden) == ("return_hidden_states.layers[1]", True)
    err = refused(config_for(Policy(hidden_state_layers=())), spec)
    assert err.field == "return_hidden_states.layers[0]"


def test_a_policy_that_restricts_reads_returns_no_hidden_states_unless_it_names_the_layers(config_for) -> None:
    spec = RequestSpec.model_validate({"return_hidden_states": {"layers": [1]}})
    for policy in (Policy(allow_readout=False), Policy(readable={"l1": FeatureSelector(tags=("safety",))}),
                   Policy(probes=())):
        err = refused(config_for(policy), spec)  # the stream would show every feature the policy hides
        assert (err.field, err.forbidden) == ("return_hidden_states", True)
    allowed = Policy(readable={"l1": FeatureSelector(tags=("safety",))}, hidden_state_layers=(1,))
    assert config_for(allowed).prepare(spec).reads_states
