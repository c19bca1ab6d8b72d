"""helm/sae-serve with the real helm binary: lint, render, validate the manifests against the
Kubernetes schemas offline, and check what the rendered pod would do. (No cluster runs here: the
manifests are validated, and the pieces a pod runs are run locally where they can be.)"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sae_serve.config import load_config
from sae_serve.data import DEFAULT_SAE_DIR
from tests.deploy.tools import CHART, DASHBOARD, RULES, by_kind, render, run_helm

PRODUCTION = CHART / "ci" / "production-values.yaml"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def _validate(docs: list[dict[str, Any]], version: str) -> None:
    """Strict schema validation; a kind without a schema fails unless it is an allow-listed CRD."""
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{doc['kind']} {doc['apiVersion']} has no Kubernetes {version} schema")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc}")


def _server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["default", "production"])
def test_helm_lint_strict_passes(values: Path | None) -> None:
    out = run_helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_signing_secret_reaches_the_server_from_a_secret() -> None:
    """Every process of the server shares SAE_SERVE_SECRET: made by the chart, or the operator's."""
    made = render()
    [secret] = [d for d in made if d["kind"] == "Secret"]
    env = {e["name"]: e for e in _server(made)["env"]}
    ref = env["SAE_SERVE_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "secret"} and len(secret["data"]["secret"]) > 64
    theirs = render("--set", "signingSecret.existingSecret=mine", "--set", "signingSecret.key=k")
    assert not [d for d in theirs if d["kind"] == "Secret"]
    ref = {e["name"]: e for e in _server(theirs)["env"]}["SAE_SERVE_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mine", "key": "k"}


@pytest.mark.parametrize(("args", "crds", "version", "kinds"), [
    ((), False, "1.30.0", {"ConfigMap", "Service", "Deployment", "Secret"}),
    (("-f", str(PRODUCTION)), True, "1.30.0", {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler",
                                                "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "Secret"}),
    (("--set", "saeSource.type=image", "--set", "saeSource.image.reference=registry.example.com/saes:1",
      "--set", "apiKeys.values={k1}"), False, "1.33.0", {"ConfigMap", "Service", "Deployment", "Secret"}),
], ids=["default", "production", "image-volume"])
def test_rendered_manifests_validate_offline(args: tuple[str, ...], crds: bool, version: str, kinds: set[str]) -> None:
    docs = render(*args, crds=crds)
    assert {d["kind"] for d in docs} == kinds
    _validate(docs, version)


def test_an_invalid_manifest_is_caught() -> None:
    """The validation can fail: a misspelt field and an unknown kind."""
    deployment = by_kind(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}}, "1.30.0")


def test_the_pod_asks_for_gpus_on_gpu_nodes() -> None:
    docs = render("-f", str(PRODUCTION))
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    resources = _server(docs)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["runtimeClassName"] == "nvidia" and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "podAntiAffinity" in pod["affinity"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    two = _server(render("--set", "gpu.count=2"))
    assert two["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert two["args"][two["args"].index("--tensor-parallel-size") + 1] == "2"


def test_the_rendered_config_is_one_sae_serve_loads(tmp_path) -> None:
    docs = render("-f", str(PRODUCTION))
    data = by_kind(docs, "ConfigMap")["data"]
    (tmp_path / "config.yaml").write_text(data["config.yaml"])
    config = load_config(tmp_path / "config.yaml")
    [sae] = config.saes
    assert sae.name == "layer20" and sae.hook_layer == 20 and sae.watchlist == (1024, 2051, "deception")
    assert sae.path == "/var/lib/sae-serve/saes/gemma-2-2b/layer_20/width_65k/average_l0_61"
    assert config.policy.max_abs_multiple_of_max == 4 and config.policy.allow_vectors is False
    assert config.policy.steerable["layer20"].tags == ("language", "topic")
    assert config.metrics.enabled and config.metrics.firing_fraction_of_max == 0.3


def test_the_server_arguments_parse_as_sae_serve_and_vllm_options() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from sae_serve.cli import build_parser

    docs = render("-f", str(PRODUCTION))
    container = _server(docs)
    entrypoint = json.loads(next(line.removeprefix("ENTRYPOINT ") for line in
                                 (CHART.parents[1] / "deploy" / "Dockerfile").read_text().splitlines()
                                 if line.startswith("ENTRYPOINT ")))
    ours = build_parser().parse_args([*entrypoint[1:], *container["args"]])
    assert (ours.command, ours.host, ours.port, ours.grpc_port) == ("serve", "0.0.0.0", 8000, 8001)
    assert str(ours.config) == "/etc/sae-serve/config.yaml" and ours.model == "google/gemma-2-2b-it"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"].startswith("SAE_SERVE_API")}
    # Kubernetes expands $(VAR) in args from the container's env: here, from the Secret's keys.
    vllm_args = [a.replace("$(", "").replace(")", "") for a in ours.vllm_args if a != "--"]
    vllm = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", ours.model, *vllm_args])
    assert vllm.api_key == ["SAE_SERVE_API_KEY_0", "SAE_SERVE_API_KEY_1"]
    assert env == {"SAE_SERVE_API_KEY_0": {"name": "sae-serve-api-keys", "key": "team-a"},
                   "SAE_SERVE_API_KEY_1": {"name": "sae-serve-api-keys", "key": "team-b"}}
    assert vllm.max_num_batched_tokens == 16384 and vllm.max_model_len == 8192
    # The sizing rule: the pod's budget minus the readout workspace vLLM cannot profile.
    workspace = 16384 * 65536 * 2
    assert vllm.gpu_memory_utilization == pytest.approx(0.92 - workspace / (80 * 2**30), abs=1e-4)


def test_a_budget_too_small_for_the_readout_workspace_is_refused() -> None:
    out = run_helm("template", "rel", str(CHART), "--set", "gpu.memoryUtilization=0.06", "--set", "gpu.memoryGiB=1")
    assert out.returncode != 0 and "gpu.memoryUtilization" in out.stderr


def test_probes_use_http_health_and_the_grpc_health_service() -> None:
    from sae_serve.server.grpc_stubs import load

    container = _server(render())
    assert container["startupProbe"]["httpGet"] == container["livenessProbe"]["httpGet"] == {
        "path": "/health", "port": "http"}
    pb, _ = load()
    assert container["readinessProbe"]["grpc"] == {"port": 8001,
                                                   "service": pb.DESCRIPTOR.services_by_name["SaeServe"].full_name}


def _checksum_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    init = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    return next(c for c in init if c["name"] == "verify-saes")


def test_the_checksum_init_container_accepts_good_files_and_refuses_a_corrupt_one(tmp_path) -> None:
    """Runs the rendered init container's own command on a copy of the shipped SAE."""
    folder = tmp_path / "saes" / "default"
    shutil.copytree(DEFAULT_SAE_DIR, folder)
    weights = folder / "sae_weights.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    docs = render("--set", "saes[0].name=layer15", "--set", "saes[0].path=default", "--set", "saes[0].dModel=576",
                  "--set", "saes[0].dSae=4608", "--set", "saes[0].dtypeBytes=4",
                  "--set", f"saes[0].sha256.sae_weights\\.safetensors={digest}")
    (tmp_path / "SHA256SUMS").write_text(by_kind(docs, "ConfigMap")["data"]["SHA256SUMS"])
    container = _checksum_container(docs)
    env = {"PATH": "/usr/bin:/bin", "SAE_DIR": str(tmp_path / "saes"), "CHECKSUMS": str(tmp_path / "SHA256SUMS")}
    ok = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    bad = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "default/sae_weights.safetensors: FAILED" in bad.stdout


def test_sae_sources_mount_the_weights_read_only() -> None:
    def volume(*args: str) -> dict[str, Any]:
        spec = by_kind(render(*args), "Deployment")["spec"]["template"]["spec"]
        return next(v for v in spec["volumes"] if v["name"] == "saes")

    assert volume() == {"name": "saes", "persistentVolumeClaim": {"claimName": "sae-weights", "readOnly": True}}
    assert volume("-f", str(PRODUCTION)) == {"name": "saes", "emptyDir": {"sizeLimit": "10Gi"}}
    assert volume("--set", "saeSource.type=image", "--set", "saeSource.image.reference=r/s:1")["image"] == {
        "reference": "r/s:1", "pullPolicy": "IfNotPresent"}
    spec = by_kind(render("-f", str(PRODUCTION)), "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["fetch-saes", "verify-saes"]
    assert {"name": "saes", "mountPath": "/var/lib/sae-serve/saes", "readOnly": True} in spec["containers"][0][
        "volumeMounts"]


def test_operator_objects_carry_the_shipped_rules_and_dashboard() -> None:
    docs = render("-f", str(PRODUCTION), crds=True)
    assert by_kind(docs, "PrometheusRule")["spec"] == yaml.safe_load(RULES.read_text())
    monitor = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    dashboard = next(d for d in docs if d["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["sae-serve.json"]) == json.loads(DASHBOARD.read_text())
    assert not {"ServiceMonitor", "PrometheusRule"} & {d["kind"] for d in render("-f", str(PRODUCTION))}


@pytest.mark.parametrize(("args", "field"), [
    (("--set", "gpu.count=0"), "/gpu/count"),
    (("--set", "gpu.memoryUtilization=1.5"), "/gpu/memoryUtilization"),
    (("--set", "saes[0].name=x", "--set", "saes[0].path=../../etc", "--set", "saes[0].dModel=1",
      "--set", "saes[0].dSae=1", "--set", "saes[0].dtypeBytes=2"), "/saes/0/path"),
    (("--set", "saes[0].name=x", "--set", "saes[0].path=p", "--set", "saes[0].dModel=1",
      "--set", "saes[0].dSae=1", "--set", "saes[0].dtypeBytes=3"), "/saes/0/dtypeBytes"),
    (("--set", "saeSource.type=objectStorage"), "/saeSource/objectStorage/url"),
    (("--set", "saeSource.type=nfs"), "/saeSource/type"),
    (("--set", "service.grpcPort=70000"), "/service/grpcPort"),
    (("--set", "gpuCount=1"), "gpuCount"),
])
def test_values_schema_rejects_bad_values_naming_the_field(args: tuple[str, ...], field: str) -> None:
    out = run_helm("template", "rel", str(CHART), *args)
    assert out.returncode != 0 and "values don't meet the specifications" in out.stderr
    assert field in out.stderr
