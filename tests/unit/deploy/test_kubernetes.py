"""deploy/kubernetes: each overlay, rendered as `kustomize build` would, validates against the
Kubernetes OpenAPI schemas offline (kubernetes-validate ships them), and holds what the fleet
relies on: 2+ gateways hot-reloading a ConfigMap that discovers replicas through a headless
Service, replicas ready on /ping, GPUs in the gpu overlay, disruption budgets, the HPA."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import parse_config
from tests.support.kustomize import build, merge

ROOT = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest version whose schemas have everything used (preStop sleep)


def _validate(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def _by_kind(resources: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlay_renders_and_validates(overlay: str) -> None:
    resources = build(ROOT / "overlays" / overlay)
    for resource in resources:
        _validate(resource)
    kinds = sorted(k for k, _ in _by_kind(resources))
    expected = "ConfigMap Deployment Deployment Namespace PodDisruptionBudget PodDisruptionBudget"
    assert kinds == [*expected.split(), "Service", "Service"]
    assert {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"} == {
        "infergate"
    }


def test_gateways_reload_their_configmap_and_discover_the_headless_service() -> None:
    res = _by_kind(build(ROOT / "overlays" / "cpu"))
    gateway = res[("Deployment", "infergate-gateway")]["spec"]
    assert gateway["replicas"] >= 2
    pod = gateway["template"]["spec"]
    mount = pod["containers"][0]["volumeMounts"][0]
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap edits
    assert pod["volumes"][0]["configMap"]["name"] == "infergate-gateway"
    args = pod["containers"][0]["args"]
    assert args[args.index("-c") + 1] == mount["mountPath"] + "/gateway.yaml"

    config = parse_config(
        yaml.safe_load(res[("ConfigMap", "infergate-gateway")]["data"]["gateway.yaml"])
    )
    headless = res[("Service", "infergate-replica")]["spec"]
    assert headless["clusterIP"] == "None"
    assert config.discovery is not None
    assert config.discovery.dns == "infergate-replica"
    assert config.discovery.port == headless["ports"][0]["port"]
    assert (
        res[("Service", "infergate-gateway")]["spec"]["selector"]
        == (gateway["selector"]["matchLabels"])
    )


@pytest.mark.parametrize(("overlay", "gpus"), [("cpu", None), ("gpu", 1)])
def test_replicas_ready_on_ping_with_a_gpu_each_in_the_gpu_overlay(
    overlay: str, gpus: int | None
) -> None:
    res = _by_kind(build(ROOT / "overlays" / overlay))
    container = res[("Deployment", "infergate-replica")]["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert container["resources"]["limits"].get("nvidia.com/gpu") == gpus
    engine = container["args"][container["args"].index("--engine") + 1]
    assert engine == ("torch" if gpus else "simulated")
    budget = res[("PodDisruptionBudget", "infergate-replica")]["spec"]
    assert (
        budget["selector"]["matchLabels"]
        == (res[("Deployment", "infergate-replica")]["spec"]["selector"]["matchLabels"])
    )


def test_autoscaling_example_validates_and_scales_the_replicas_on_queue_depth() -> None:
    hpa = yaml.safe_load((ROOT / "examples" / "replica-hpa.yaml").read_text())
    _validate(hpa)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "infergate-replica"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "replica_queue_depth"


def test_a_broken_manifest_is_caught() -> None:
    deployment = _by_kind(build(ROOT / "overlays" / "cpu"))[("Deployment", "infergate-gateway")]
    for broken in (
        merge(deployment, {"spec": {"replicas": "two"}}),
        merge(deployment, {"spec": {"template": {"spec": {"containerz": []}}}}),  # strict
    ):
        with pytest.raises(kubernetes_validate.ValidationError):
            _validate(broken)


def test_strategic_merge_merges_named_lists_and_replaces_others() -> None:
    base = {"containers": [{"name": "a", "args": [1], "x": 1}], "keep": 1, "drop": 2}
    patch = {"containers": [{"name": "a", "args": [2]}, {"name": "b"}], "drop": None}
    assert merge(base, patch) == {
        "containers": [{"name": "a", "args": [2], "x": 1}, {"name": "b"}],
        "keep": 1,
    }


def test_the_jobs_overlay_shares_a_postgresql_store_whose_url_is_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resources = build(ROOT / "overlays" / "jobs-postgres")
    for resource in resources:
        _validate(resource)
    res = _by_kind(resources)
    gateway = res[("Deployment", "infergate-gateway")]["spec"]
    assert gateway["replicas"] >= 2  # several gateways on one store: what it is for
    (env,) = [
        e for e in gateway["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "INFERGATE_JOBS_STORE"
    ]  # fmt: skip
    ref = env["valueFrom"]["secretKeyRef"]
    url = res[("Secret", ref["name"])]["stringData"][ref["key"]]
    monkeypatch.setenv("INFERGATE_JOBS_STORE", url)
    raw = res[("ConfigMap", "infergate-gateway")]["data"]["gateway.yaml"]
    assert "${INFERGATE_JOBS_STORE}" in raw and "CHANGE-ME" not in raw  # no secret in it
    config = parse_config(yaml.safe_load(raw))
    assert config.jobs is not None and config.jobs.store == url
    assert config.discovery is not None and config.discovery.dns == "infergate-replica"

    # The URL names the example server: its Service, port, user, database and password.
    parts = urllib.parse.urlsplit(url)
    service = res[("Service", parts.hostname)]["spec"]
    assert parts.port == service["ports"][0]["port"]
    pod = res[("StatefulSet", parts.hostname)]["spec"]["template"]["spec"]["containers"][0]
    env_of = {e["name"]: e for e in pod["env"]}
    assert env_of["POSTGRES_USER"]["value"] == parts.username
    assert env_of["POSTGRES_DB"]["value"] == parts.path.lstrip("/")
    password = env_of["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert res[("Secret", password["name"])]["stringData"][password["key"]] == parts.password
