"""deploy/docker and deploy/prometheus + grafana, checked statically (no Docker daemon here):
the compose file parses and wires 2 gateways on a PostgreSQL job store, 2 simulated replicas,
Prometheus and Grafana; the
gateway image installs the gateway alone (no torch anywhere in its dependency closure)."""

from __future__ import annotations

import json
import re
import urllib.parse
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from gateway.config import parse_config

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "deploy" / "docker"


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return compose


def _arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_compose_runs_two_gateways_a_job_store_two_simulated_replicas_and_monitoring() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {
        "gateway", "gateway-2", "postgres", "replica", "prometheus", "grafana",
    }  # fmt: skip
    replica = services["replica"]
    assert replica["deploy"]["replicas"] == 2
    assert _arg(replica["command"], "--engine") == "simulated"
    assert services["gateway"]["ports"] == ["8080:8080"]
    assert services["gateway-2"]["ports"] == ["8081:8080"]
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["grafana"]["ports"] == ["3000:3000"]
    for name in ("gateway", "gateway-2", "replica"):
        build = services[name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host in compose.get("volumes", {}):
                continue  # a named volume, made by compose
            assert (DOCKER / host).exists(), f"{host} is mounted but missing"


@pytest.mark.parametrize("name", ["gateway", "gateway-2"])
def test_compose_gateways_discover_the_replicas_and_share_the_postgres_job_store(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = _compose()
    gateway = compose["services"][name]
    mount = gateway["volumes"][0].split(":")
    config_dir = DOCKER / mount[0]
    gateway_cmd = (DOCKER / "gateway.Dockerfile").read_text()
    assert f'"{mount[1]}/gateway.yaml"' in gateway_cmd
    for variable, value in gateway["environment"].items():
        monkeypatch.setenv(variable, value)
    config = parse_config(yaml.safe_load((config_dir / "gateway.yaml").read_text()))
    assert config.discovery is not None and config.discovery.dns == "replica"
    assert str(config.discovery.port) == _arg(compose["services"]["replica"]["command"], "--port")
    assert config.listen.host == "0.0.0.0"

    assert config.jobs is not None
    url = urllib.parse.urlsplit(config.jobs.store)
    postgres = compose["services"]["postgres"]
    assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432
    assert (url.username, url.password, url.path) == (
        postgres["environment"]["POSTGRES_USER"],
        postgres["environment"]["POSTGRES_PASSWORD"],
        "/" + postgres["environment"]["POSTGRES_DB"],
    )
    assert gateway["depends_on"]["postgres"] == {"condition": "service_healthy"}


def _instructions(dockerfile: str) -> list[str]:
    text = (DOCKER / dockerfile).read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_gateway_image_installs_only_the_gateway() -> None:
    lines = _instructions("gateway.Dockerfile")
    assert lines[0].startswith("FROM python:3.11-slim")
    copies = [line.split()[1] for line in lines if line.startswith("COPY")]
    assert copies == ["pyproject.toml", "gateway"]
    installs = [line for line in lines if "pip install" in line]
    assert installs == ["RUN pip install . && rm -rf /src"]  # no extra: no torch
    ignore = (DOCKER / "gateway.Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :][:3] == ["!pyproject.toml", "!README.md", "!gateway/**"]


def test_replica_image_builds_on_a_cuda_torch_base() -> None:
    lines = _instructions("replica.Dockerfile")
    base = next(line for line in lines if line.startswith("ARG BASE_IMAGE="))
    assert re.fullmatch(r"ARG BASE_IMAGE=pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base)
    assert "RUN pip install '.[replica]'" in "\n".join(lines)


def _closure(requirement: str, seen: set[str]) -> set[str]:
    """Names of the installed distributions a requirement pulls in, extras not requested."""
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return seen
    name = req.name.lower().replace("_", "-")
    if name in seen:
        return seen
    seen.add(name)
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return seen
    for sub in dist.requires or []:
        _closure(sub, seen)
    return seen


def test_torch_is_only_in_the_replica_extra() -> None:
    project = distribution("infergate")
    base = [r for r in project.requires or [] if "extra ==" not in r]
    pulled: set[str] = set()
    for requirement in base:
        _closure(requirement, pulled)
    assert "dnspython" in pulled and "aiohttp" in pulled
    assert "torch" not in pulled
    torch_in = [r for r in project.requires or [] if Requirement(r).name == "torch"]
    assert torch_in == ['torch>=2.2; extra == "replica"']


def test_prometheus_and_grafana_are_wired_to_the_fleet() -> None:
    compose = _compose()["services"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    targets = jobs["infergate-gateway"]["static_configs"][0]["targets"]
    assert targets == ["gateway:8080", "gateway-2:8080"]
    assert jobs["infergate-replica"]["dns_sd_configs"][0]["names"] == ["replica"]
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert (
        "../prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["prometheus"]["volumes"]
    )
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    for needed in ("ReplicaDown", "P99OverTarget", "QueueSaturation", "ReplicaEjections"):
        assert f"Infergate{needed}" in alerts
    assert all({"expr", "labels", "annotations"} <= set(rule) for rule in alerts.values())

    grafana = ROOT / "deploy" / "grafana"
    source = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yaml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((grafana / "provisioning/dashboards/infergate.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"../grafana/dashboards:{path}:ro" in compose["grafana"]["volumes"]
    dashboard = json.loads((grafana / "dashboards/infergate.json").read_text())
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("outstanding", "request rate", "p99", "first token", "per output token"):
        assert topic in titles
    for topic in ("batch size", "queue depth", "ejections"):
        assert topic in titles
