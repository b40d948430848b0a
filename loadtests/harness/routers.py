"""The prefix benchmark's front ends, each run as N instances with the same configuration, the
client choosing one at random per request (what a plain load balancer in front of N gateways
does): our gateway with one routing strategy, and SGLang's and vLLM's routers at their defaults.

`precise_prefix` polls each replica's GET /cache/blocks; `precise_prefix:events` follows the
replicas' KV cache events instead (vLLM's ZeroMQ wire), so it needs replicas that publish them.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from loadtests.harness.runner import front_end_process, gateway_process

EVENTS = "precise_prefix:events"
OURS = (
    "random", "least_outstanding_requests", "affinity", "prefix_aware", "precise_prefix", EVENTS,
)  # fmt: skip
PEERS = {  # name: (console script, its arguments before the common ones, policy)
    "sglang:cache_aware": ("sglang-router", ["launch"], "cache_aware"),
    "sglang:power_of_two": ("sglang-router", ["launch"], "power_of_two"),
    "vllm:cache_aware": ("vllm-router", [], "cache_aware"),
    "vllm:consistent_hash": ("vllm-router", [], "consistent_hash"),
}
PORTS_PER_INSTANCE = 2  # its HTTP port, and the Rust routers' Prometheus port


@dataclass(frozen=True)
class Fleet:
    """What the front ends are put in front of."""

    urls: list[str]
    kv_events: list[tuple[str, str]]  # each replica's event endpoint and replay endpoint


def gateway_extra(name: str, seed: int, fleet: Fleet) -> dict[str, Any]:
    """The gateway config for strategy `name`, over runner.gateway_process's defaults."""
    if name != EVENTS:
        return {"routing": {"strategy": name, "seed": seed}}
    replicas = [
        {"url": url, "kv_events": {"endpoint": endpoint, "replay_endpoint": replay}}
        for url, (endpoint, replay) in zip(fleet.urls, fleet.kv_events, strict=True)
    ]
    routing = {"strategy": "precise_prefix", "seed": seed, "prefix": {"events": {}}}
    return {"routing": routing, "replicas": replicas}


def peer_command(name: str) -> list[str] | None:
    script, prefix, _ = PEERS[name]
    path = shutil.which(script) or shutil.which(script, path=str(Path(sys.executable).parent))
    return [path, *prefix] if path else None


def available(names: list[str]) -> list[str]:
    kept = []
    for name in names:
        if name in OURS or peer_command(name) is not None:
            kept.append(name)
        else:
            print(
                f"  skipped {name}: {PEERS[name][0]} is not installed (pip install -e '.[peers]')"
            )
    return kept


@contextlib.contextmanager
def front_end(
    name: str, fleet: Fleet, port: int, seed: int, workdir: Path, log: IO[bytes]
) -> Iterator[str]:
    """One instance listening on `port` (a Rust router also takes `port + 1`); yields its URL."""
    if name in OURS:
        extra = gateway_extra(name, seed, fleet)
        with gateway_process(fleet.urls, name, seed, port, workdir, log, extra) as (url, _):
            yield url
        return
    command = peer_command(name)
    assert command is not None, name
    cmd = [
        *command, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *fleet.urls,
        "--policy", PEERS[name][2], "--prometheus-port", str(port + 1), "--log-level",
        "warn" if name.startswith("sglang") else "warning",
    ]  # fmt: skip
    if name.startswith("sglang"):
        cmd += ["--prometheus-host", "127.0.0.1"]
    with front_end_process(cmd, port, "/readiness", log) as (url, _):
        yield url


@contextlib.contextmanager
def front_ends(
    name: str, instances: int, fleet: Fleet, first_port: int, seed: int, workdir: Path,
    log: IO[bytes],
) -> Iterator[list[str]]:  # fmt: skip
    """`instances` instances of front end `name`, on ports from `first_port`
    (PORTS_PER_INSTANCE each); yields their URLs once every one is ready."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                front_end(name, fleet, first_port + PORTS_PER_INSTANCE * i, seed, workdir, log)
            )
            for i in range(instances)
        ]
