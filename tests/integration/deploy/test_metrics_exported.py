"""Every metric the Grafana dashboard and the Prometheus alert rules query is one the code
exports: checked against live /metrics of a real gateway in front of a real replica process
(simulated engine) after a few requests, completions streamed and not, and a classification."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import yaml

from tests.support.processes import start_replica, wait_replica_ready
from tests.support.servers import running_gateway, write_config

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "le",
}  # fmt: skip
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (labels, ranges and functions removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    functions = set(re.findall(r"([A-Za-z_:][\w:]*)\s*\(", expr))
    words = set(re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", expr))
    return words - functions - PROMQL_WORDS


def queried_metrics() -> Iterator[tuple[str, str]]:
    """(where, metric) for every expression of the dashboard and the alert rules."""
    dashboard = json.loads((DEPLOY / "grafana/dashboards/infergate.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in metric_names(target["expr"]):
                yield f"dashboard '{panel['title']}'", name
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                yield f"alert {rule['alert']}", name


def exported(text: str) -> set[str]:
    """Sample names of a /metrics page, histogram and summary series included before their
    first observation (from the TYPE lines)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name + suffix for suffix in SUFFIXES.get(kind, ("",))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_promql_names_are_extracted() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, model) (rate(replica_ttft_seconds_bucket[5m]))) > 2"
        ' and on (model) max(replica_queue_depth{model="tiny-gpt"} / replica_queue_capacity)'
        " > 1e3"
    )
    assert metric_names(expr) == {
        "replica_ttft_seconds_bucket", "replica_queue_depth", "replica_queue_capacity",
    }  # fmt: skip


async def test_dashboard_and_alerts_use_only_exported_metrics(tmp_path: Path) -> None:
    queried = list(queried_metrics())
    assert len(queried) > 20
    process, replica_url = await start_replica("--engine", "simulated")
    try:
        async with aiohttp.ClientSession() as client:
            await wait_replica_ready(client, replica_url)
            path = tmp_path / "g.yaml"
            write_config(path, {"replicas": [{"url": replica_url}]})
            async with running_gateway(path) as gw:
                for stream in (False, True):
                    body = {"prompt": "hi", "max_tokens": 4, "stream": stream}
                    async with client.post(f"{gw.url}/v1/completions", json=body) as response:
                        assert response.status == 200
                        await response.read()
                body = {"inputs": [{"name": "input", "shape": [1, 1024], "datatype": "FP32",
                                    "data": [0.0] * 1024}]}  # fmt: skip
                async with client.post(f"{gw.url}/v2/models/classifier/infer", json=body) as r:
                    assert r.status == 200, await r.text()
                pages = []
                for url in (gw.url, replica_url):
                    async with client.get(f"{url}/metrics") as response:
                        pages.append(await response.text())
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
    names = exported(pages[0]) | exported(pages[1])
    missing = sorted({f"{where}: {name}" for where, name in queried if name not in names})
    assert not missing, "queried but not exported:\n" + "\n".join(missing)
    assert {"replica_ttft_seconds_bucket", "gateway_request_duration_seconds_bucket"} <= names
