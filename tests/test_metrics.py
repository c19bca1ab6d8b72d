"""Metric values from the real classes, each test on a fresh CollectorRegistry."""

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sae_serve.metrics import ApiMetrics, WorkerMetrics


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_worker_metrics_take_totals_as_prometheus_would_observe_them() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    # 4 tokens; "wrongdoing" active at 1.0 and 2.5 (fires once above 2.0), "7" at 3.0 and 0.5.
    metrics.add_feature_totals("l15", ["wrongdoing", "7"], 4, [1, 1],
                               [[0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0]], [3.5, 3.5])
    assert value(registry, "sae_serve_feature_tokens_total", sae="l15", feature="wrongdoing") == 4
    assert value(registry, "sae_serve_feature_fired_tokens_total", sae="l15", feature="wrongdoing") == 1
    assert value(registry, "sae_serve_feature_fired_tokens_total", sae="l15", feature="7") == 1
    assert value(registry, "sae_serve_feature_activation_count", sae="l15", feature="wrongdoing") == 2  # active only
    assert value(registry, "sae_serve_feature_activation_sum", sae="l15", feature="wrongdoing") == 3.5
    assert value(registry, "sae_serve_feature_activation_bucket", sae="l15", feature="7", le="0.5") == 1
    assert value(registry, "sae_serve_feature_activation_bucket", sae="l15", feature="7", le="4.0") == 2
    metrics.hook_seconds.labels("l15").observe(0.002)
    text = generate_latest(registry).decode()
    assert 'sae_serve_hook_seconds_count{sae="l15"} 1.0' in text


def test_api_metrics_through_the_service(tmp_path) -> None:
    from sae_serve.config import SaeServeConfig
    from sae_serve.errors import PolicyError, SpecError
    from sae_serve.sae.formats import save_sae
    from sae_serve.sae.registry import SaeEntry
    from sae_serve.server.service import SteeringService
    from sae_serve.steering.policy import Policy
    from sae_serve.steering.spec import RequestSpec
    from tests.conftest import make_sae

    save_sae(make_sae("relu", 16, 64), tmp_path / "s")
    registry = CollectorRegistry()
    service = SteeringService(SaeServeConfig(saes=(SaeEntry(name="l1", path=str(tmp_path / "s")),),
                                             policy=Policy(max_abs_value=5)), ApiMetrics(registry))

    def spec(**iv) -> RequestSpec:
        return RequestSpec.model_validate({"steering": {"interventions": [{"sae": "l1", **iv}]}})

    service.prepare(spec(feature=1, mode="clamp", value=2.0))
    service.prepare(spec(feature=1, mode="scale", value=0.0))
    service.prepare(RequestSpec())
    for bad, error in ((spec(feature=99, mode="add", value=1.0), SpecError),
                       (spec(feature=1, mode="add", value=9.0), PolicyError)):
        with pytest.raises(error):
            service.prepare(bad)
    assert value(registry, "sae_serve_steered_requests_total", mode="clamp") == 1
    assert value(registry, "sae_serve_steered_requests_total", mode="scale") == 1
    with pytest.raises(SpecError) as info:  # malformed JSON bodies are counted too, with the field named
        service.parse({"steering": {"interventions": [{"sae": "l1", "feature": 1, "mode": "add", "value": "NaN"}]}})
    assert info.value.field == "steering.interventions[0].value"
    assert value(registry, "sae_serve_refused_requests_total", reason="invalid") == 2
    assert value(registry, "sae_serve_refused_requests_total", reason="policy_limit") == 1


def test_watched_features_and_reasons_are_exported_at_zero_from_the_start() -> None:
    """So that rate() and alerts work before a watched feature first fires."""
    registry = CollectorRegistry()
    WorkerMetrics(registry).declare_watched("l15", ["wrongdoing"])
    ApiMetrics(registry)
    labels = {"sae": "l15", "feature": "wrongdoing"}
    for name in ("sae_serve_feature_tokens_total", "sae_serve_feature_fired_tokens_total",
                 "sae_serve_feature_activation_count"):
        assert registry.get_sample_value(name, labels) == 0, name
    assert registry.get_sample_value("sae_serve_rejected_specs_total", {"reason": "unauthenticated"}) == 0
    assert registry.get_sample_value("sae_serve_refused_requests_total", {"reason": "worker_error"}) == 0
