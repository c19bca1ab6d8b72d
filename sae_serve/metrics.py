"""Prometheus metrics (names: ``sae_serve_`` prefix, base units, ``_total`` on counters).

Worker side (``WorkerMetrics``, fed by the vLLM plugin every step): activations of the watched
features on every token, how many tokens they fire on, and the time the hook takes. API side
(``ApiMetrics``): steered requests by mode and refused requests by reason. Labels stay bounded:
the SAE name, a watched feature's label (or index), a mode, a reason; never a request.
Under ``sae-serve serve`` the workers write to PROMETHEUS_MULTIPROC_DIR and vLLM's /metrics
collects every process. (A top-level module, not server/: the engine's workers feed it.)
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

ACTIVATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
HOOK_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.activation = Histogram(
            "sae_serve_feature_activation", "Activation of a watched feature on tokens where it is active.",
            ["sae", "feature"], buckets=ACTIVATION_BUCKETS, registry=registry)
        self.tokens = Counter("sae_serve_feature_tokens", "Tokens on which a watched feature was computed.",
                              ["sae", "feature"], registry=registry)
        self.fired = Counter("sae_serve_feature_fired_tokens",
                             "Tokens on which a watched feature exceeded its firing threshold.",
                             ["sae", "feature"], registry=registry)
        self.hook_seconds = Histogram("sae_serve_hook_seconds", "Time of the steering hook per step and SAE.",
                                      ["sae"], buckets=HOOK_BUCKETS, registry=registry)
        self.rejected_specs = Counter(
            "sae_serve_rejected_specs", "Steering specs a worker ignored: unauthenticated (not signed by the "
            "service, e.g. smuggled in vllm_xargs), invalid or unrunnable there.", ["reason"], registry=registry)
        self.readout_bytes = Gauge("sae_serve_pending_readout_bytes",
                                   "Bytes of feature activations the workers hold for the API to fetch.",
                                   registry=registry, multiprocess_mode="livesum")
        for reason in ("unauthenticated", "invalid", "unrunnable"):
            self.rejected_specs.labels(reason)

    def declare_watched(self, sae: str, names: list[str]) -> None:
        """Export every watched feature's series at 0 from the start, so rate() and alerts work
        before its first firing."""
        for name in names:
            self.tokens.labels(sae, name)
            self.fired.labels(sae, name)
            self.activation.labels(sae, name)

    def add_feature_totals(self, sae: str, names: list[str], tokens: int, fired: list[int],
                           histogram: list[list[int]], sums: list[float]) -> None:
        """Totals of the watched features over some steps (``steering/watch.py`` keeps them):
        ``tokens`` seen, ``fired[j]`` tokens above feature j's threshold, ``histogram[j]`` its
        active values per bucket of ACTIVATION_BUCKETS (then +Inf), ``sums[j]`` their sum."""
        for j, name in enumerate(names):
            self.tokens.labels(sae, name).inc(tokens)
            if fired[j]:
                self.fired.labels(sae, name).inc(fired[j])
            child = self.activation.labels(sae, name)
            # prometheus_client observes one value at a time; its buckets and sum take counts.
            for bucket, count in zip(child._buckets, histogram[j], strict=True):
                if count:
                    bucket.inc(count)
            if sums[j]:
                child._sum.inc(sums[j])


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.steered = Counter("sae_serve_steered_requests", "Requests that steer, by intervention mode.",
                               ["mode"], registry=registry)
        self.refused = Counter("sae_serve_refused_requests", "Requests refused by validation, policy or "
                               "limits, or failed by a worker after admission (worker_error).",
                               ["reason"], registry=registry)
        for reason in ("invalid", "policy_forbidden", "policy_limit", "capacity", "worker_error"):
            self.refused.labels(reason)
        self.guardrail_triggered = Counter(
            "sae_serve_guardrail_triggered", "Guardrails that fired, once per request, by rule and action "
            "(rule: the name a request or the server config gave it).", ["rule", "action"], registry=registry)


_WORKER: WeakKeyDictionary[CollectorRegistry, WorkerMetrics] = WeakKeyDictionary()
_API: WeakKeyDictionary[CollectorRegistry, ApiMetrics] = WeakKeyDictionary()


class SilentMetrics:
    """The metrics of a worker that does not report: a tensor-parallel rank after the first steers
    the same tokens as the first, which counts them once for the deployment. Every update is
    dropped (with PROMETHEUS_MULTIPROC_DIR, any real metric in any process would be summed)."""

    def __getattr__(self, name: str) -> SilentMetrics:
        return self

    def __call__(self, *args: object, **kwargs: object) -> SilentMetrics:
        return self


def worker_metrics(registry: CollectorRegistry = REGISTRY) -> WorkerMetrics:
    """One set per registry: a process that loads the plugin twice shares it."""
    if registry not in _WORKER:
        _WORKER[registry] = WorkerMetrics(registry)
    return _WORKER[registry]


def api_metrics(registry: CollectorRegistry = REGISTRY) -> ApiMetrics:
    if registry not in _API:
        _API[registry] = ApiMetrics(registry)
    return _API[registry]
