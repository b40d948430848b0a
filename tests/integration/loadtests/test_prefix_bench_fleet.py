"""The prefix benchmark's fleet, briefly: replicas publishing KV cache events with vLLM-like
hashes (which no router can reproduce), two instances of `precise_prefix:events` before them,
its KV-pressure chats spread at random over both. Each instance follows every replica's events
(stores and evictions) to exactly the blocks the replica holds, the watch counts what they
stored and evicted, and nothing is left running."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.cluster import ClusterConfig, kv_endpoints, replica_urls, replicas_running, wait_ready
from loadtests.harness.kv_watch import KvWatch
from loadtests.harness.routers import EVENTS, PORTS_PER_INSTANCE, Fleet, front_ends
from loadtests.harness.runner import free_port_block
from loadtests.prefix_bench import Sample, drive_closed, replica_yaml

REPLICAS, INSTANCES = 2, 2
KV_TOKENS = 8192  # a replica's KV: half the profile's, so blocks are evicted in seconds
ROUNDS = 3  # of 4 s each, at most


def small_replica_yaml(workdir: Path) -> Path:
    path = replica_yaml(workdir, "vllm")
    config = yaml.safe_load(path.read_text())
    config["models"][0]["batcher"]["kv_capacity_tokens"] = KV_TOKENS
    path.write_text(yaml.safe_dump(config))
    return path


def held_blocks(gateway: str) -> dict[str, float]:
    """gateway_kv_events_blocks by replica: what this gateway's feed says each one holds."""
    text = httpx.get(f"{gateway}/metrics", timeout=5).text
    return {
        s.labels["replica"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_kv_events_blocks"
    }


def cached_blocks(replica: str) -> float:
    return len(httpx.get(f"{replica}/cache/blocks", timeout=5).json()["blocks"])


def settled(gateways: list[str], fleet: Fleet) -> list[dict[str, float]]:
    """Each gateway's view, once it matches the replicas' own (events arrive in milliseconds)."""
    truth = {url: cached_blocks(url) for url in fleet.urls}
    deadline = time.monotonic() + 5
    while True:
        views = [held_blocks(g) for g in gateways]
        if all(view == truth for view in views) or time.monotonic() > deadline:
            return [truth, *views]
        time.sleep(0.1)


def test_event_driven_gateways_follow_replicas_whose_hashes_they_cannot_reproduce(
    tmp_path: Path,
) -> None:
    before = set(psutil.Process().children(recursive=True))  # e.g. multiprocessing's tracker
    fronts = free_port_block(PORTS_PER_INSTANCE * INSTANCES + 3 * REPLICAS, start=38000)
    first = fronts + PORTS_PER_INSTANCE * INSTANCES
    cluster = ClusterConfig(
        replicas=REPLICAS, engine="simulated", replica_config=small_replica_yaml(tmp_path),
        first_replica_port=first, kv_events_port=first + REPLICAS,
    )  # fmt: skip
    fleet = Fleet(replica_urls(cluster), [kv_endpoints(cluster, i) for i in range(REPLICAS)])
    with open(tmp_path / "processes.log", "ab") as log, replicas_running(cluster, log) as procs:
        asyncio.run(wait_ready(fleet.urls, procs))
        with (
            KvWatch([endpoint for endpoint, _ in fleet.kv_events]) as kv,
            front_ends(EVENTS, INSTANCES, fleet, fronts, 0, tmp_path, log) as gateways,
        ):
            samples: list[Sample] = []
            for seed in range(ROUNDS):  # until each replica has evicted: routing may favour one
                samples += asyncio.run(
                    drive_closed(gateways, "kv-pressure", seed, 8, (0, 4), REPLICAS)
                )
                if all(kv.removed):
                    break
            truth, *views = settled(gateways, fleet)
            started = [p for p in psutil.Process().children(recursive=True) if p not in before]
    assert samples and all(s.ok for s in samples)
    assert {s.front for s in samples} == set(range(INSTANCES))  # both instances took requests
    assert all(truth.values()) and views == [truth] * INSTANCES
    assert all(kv.stored) and all(kv.removed) and kv.undecodable == 0
    assert len(started) == REPLICAS + INSTANCES
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive
