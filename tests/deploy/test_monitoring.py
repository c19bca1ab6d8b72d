"""deploy/prometheus/rules.yaml and deploy/grafana/sae-serve.json: promtool checks and unit tests of
every alert (Debian's prometheus package), and the dashboard's structure. That every metric they
name is exported by a running server is tested against the real server in tests/server/test_serve.py."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.tools import DASHBOARD, RULES, all_expressions, metric_names, rule_groups


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool comes with the Debian package prometheus (`make install-system`)")
    return binary


def test_rules_pass_promtool_check() -> None:
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 11 rules found" in out.stdout


def test_every_alert_has_a_passing_promtool_unit_test() -> None:
    tests = RULES.with_name("rules_test.yaml")
    out = subprocess.run([_promtool(), "test", "rules", tests.name], capture_output=True, text=True, cwd=RULES.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for t in yaml.safe_load(tests.read_text())["tests"]
              for t in t.get("alert_rule_test", [])}
    assert alerts == tested == {"SaeServeWatchedFeatureFiring", "SaeServePolicyRejectionSpike",
                                "SaeServeGuardrailAborting", "SaeServeHookOverBudget", "SaeServeMonitoringStalled"}


def test_a_broken_alert_fails_its_unit_test(tmp_path) -> None:
    """The unit tests can fail: raise the firing threshold so the alert no longer fires."""
    (tmp_path / "rules.yaml").write_text(RULES.read_text().replace("ratio5m > 0.05", "ratio5m > 0.5"))
    shutil.copy(RULES.with_name("rules_test.yaml"), tmp_path)
    out = subprocess.run([_promtool(), "test", "rules", "rules_test.yaml"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode != 0 and "SaeServeWatchedFeatureFiring" in out.stdout + out.stderr


def test_dashboard_panels_cover_the_issue() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("sae_serve_feature_fired_tokens_total", "sae_serve_feature_activation_bucket",
                   "sae_serve_steered_requests_total", "sae_serve_refused_requests_total",
                   "sae_serve_hook_seconds_bucket", "sae_serve_guardrail_triggered_total",
                   "vllm:time_to_first_token_seconds_bucket",
                   "vllm:inter_token_latency_seconds_bucket", "vllm:generation_tokens_total"):
        assert metric in exprs, metric
    assert any(p["type"] == "heatmap" for p in panels)
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in p["targets"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "sae", "feature", "model"}


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (sae, feature) (rate(sae_serve_feature_fired_tokens_total{sae=~"$sae"}[$__rate_interval]))',
     {"sae_serve_feature_fired_tokens_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[5m]))) > 1e-3",
     {"vllm:time_to_first_token_seconds_bucket"}),
    ("sae_serve:feature_firing_rate:ratio5m > 0.05 and on (sae) (up or vector(0)) == 0",
     {"sae_serve:feature_firing_rate:ratio5m", "up"}),
])
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_expression_names_some_metric() -> None:
    exprs = all_expressions()
    assert len(exprs) > 25
    assert all(metric_names(e) for e in exprs.values()), [k for k, e in exprs.items() if not metric_names(e)]
