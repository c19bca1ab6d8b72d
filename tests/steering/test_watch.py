"""Watched-feature totals against Prometheus' own per-value observe: the same exposition, padding
rows never counted. Runs on the GPU too, where totals reach Prometheus a step late."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sae_serve.metrics import ACTIVATION_BUCKETS, WorkerMetrics
from sae_serve.steering.watch import Watch
from tests.conftest import make_sae

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEATURES, NAMES, THRESHOLDS = [3, 17, 40], ["deception", "17", "power"], [0.5, 0.2, 1.0]


def flush(watch: Watch, metrics: WorkerMetrics) -> None:
    """Everything accumulated so far, into Prometheus (a test may wait for the GPU; serving never does)."""
    for _ in range(2 if DEVICE == "cuda" else 1):  # the pending snapshot, then one of everything
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        watch.publish(metrics)


def reference(registry: CollectorRegistry, sae, steps: list[torch.Tensor]) -> None:
    """What observing every token's values one by one gives."""
    act = Histogram("sae_serve_feature_activation", "", ["sae", "feature"], buckets=ACTIVATION_BUCKETS,
                    registry=registry)
    tokens = Counter("sae_serve_feature_tokens", "", ["sae", "feature"], registry=registry)
    fired = Counter("sae_serve_feature_fired_tokens", "", ["sae", "feature"], registry=registry)
    for stream in steps:
        acts = sae.encode_subset(stream, torch.tensor(FEATURES, device=stream.device)).cpu()
        for j, name in enumerate(NAMES):
            tokens.labels("s", name).inc(len(acts))
            if (acts[:, j] > THRESHOLDS[j]).any():
                fired.labels("s", name).inc(int((acts[:, j] > THRESHOLDS[j]).sum()))
            for v in acts[:, j][acts[:, j] > 0].tolist():
                act.labels("s", name).observe(v)


def samples(registry: CollectorRegistry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples
            if not s.name.endswith("_created") and s.name.startswith("sae_serve_feature")}


def test_totals_equal_per_token_observation_and_skip_padding() -> None:
    sae = make_sae("jumprelu", 16, 64, seed=2).to(DEVICE)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    watch = Watch(sae, "s", FEATURES, NAMES, THRESHOLDS, max_rows=32)
    g = torch.Generator().manual_seed(0)
    steps = []
    for live in (5, 1, 32, 0, 17):
        stream = (torch.randn(32, 16, generator=g) * 3).to(DEVICE)
        watch.set_live(live)  # the graph path: a device count, padding rows after it
        watch.accumulate(stream, watch.live)
        watch.publish(metrics)
        steps.append(stream[:live])
    flush(watch, metrics)
    want = CollectorRegistry()
    reference(want, sae, steps)
    got, expected = samples(registry), samples(want)
    assert got.keys() == expected.keys()
    for key, v in expected.items():
        assert abs(got[key] - v) <= 1e-4 * max(1.0, abs(v)), key
    assert got[("sae_serve_feature_tokens_total", (("feature", "power"), ("sae", "s")))] == 55
    text = generate_latest(registry).decode()
    assert 'sae_serve_feature_activation_bucket{feature="deception",le="+Inf",sae="s"}' in text
