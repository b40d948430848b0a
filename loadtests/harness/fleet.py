"""Real processes for fault drills: simulated-engine replicas we can kill, stop and restart,
a gateway process in front of them, and an observer of the gateway's view of the fleet."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from loadtests.harness.runner import free_port_block

ADMIN_TOKEN = "chaos"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class ReplicaProcess:
    port: int
    log: IO[bytes]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "replica",
            "--engine",
            "simulated",
            "--port",
            str(self.port),
            "--model",
            "tiny-gpt",
            "--log-level",
            "WARNING",
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as client:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with client.get(url) as response:
                    if response.status == 200:
                        return
            if loop.time() > deadline:
                raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")
            await asyncio.sleep(0.1)


def gateway_config(urls: list[str], port: int, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "routing": {"strategy": "least_outstanding_requests"},
        "replicas": [{"url": url} for url in urls],
        "health_check": {
            "path": "/ping",
            "interval_s": 0.5,
            "timeout_s": 0.5,
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
        },
        "outlier_detection": {"consecutive_failures": 3, "base_ejection_s": 2.0},
        "timeouts": {"connect_s": 1.0, "first_byte_s": 2.0, "idle_s": 5.0},
        "reload": {"poll_interval_s": 0.2},
    }
    config.update(overrides)
    return config


@dataclass
class Fleet:
    replicas: list[ReplicaProcess]
    gateway_url: str
    config_path: Path
    gateway: subprocess.Popen[bytes]
    config: dict[str, Any] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)  # further gateways' URLs (`gateways`)

    @property
    def gateway_urls(self) -> list[str]:
        return [self.gateway_url, *self.others]

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        tmp.replace(self.config_path)
        self.config = config

    def gateway_rss_bytes(self) -> int:
        import psutil

        return int(psutil.Process(self.gateway.pid).memory_info().rss)

    async def metric(self, name: str, labels: str = "") -> float:
        """Sum of the samples of one metric on the gateway's /metrics."""
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{self.gateway_url}/metrics") as response:
                text = await response.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and labels in line and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.asynccontextmanager
async def fleet(
    workdir: Path, replicas: int, *, gateways: int = 1, **overrides: Any
) -> AsyncIterator[Fleet]:
    """`replicas` simulated-engine replicas behind `gateways` gateway processes, each with the
    same config but its port (several share a job store only when it is PostgreSQL)."""
    base = free_port_block(replicas + gateways, start=23000)
    log = (workdir / "fleet.log").open("ab")
    procs = [ReplicaProcess(base + i, log) for i in range(replicas)]
    started: list[subprocess.Popen[bytes]] = []
    try:
        for replica in procs:
            replica.start()
        await asyncio.gather(*(wait_ready(f"{r.url}/ping") for r in procs))
        ports = [base + replicas + i for i in range(gateways)]
        configs = [gateway_config([r.url for r in procs], port, **overrides) for port in ports]
        paths = [
            workdir / ("gateway.yaml" if i == 0 else f"gateway{i}.yaml") for i in range(gateways)
        ]
        env = {**os.environ, "INFERGATE_ADMIN_TOKEN": ADMIN_TOKEN}
        for path, config in zip(paths, configs, strict=True):
            path.write_text(yaml.safe_dump(config))
            cmd = [sys.executable, "-m", "gateway", "-c", str(path), "--log-level", "warning"]
            started.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        await asyncio.gather(*(wait_ready(f"{url}/readyz") for url in urls))
        yield Fleet(procs, urls[0], paths[0], started[0], configs[0], urls[1:])
    finally:
        for gateway in started:
            gateway.terminate()
        for gateway in started:
            gateway.wait(30)
        for replica in procs:
            replica.stop()
        log.close()


@dataclass(frozen=True)
class Observation:
    at: float  # time.monotonic()
    url: str
    in_rotation: bool  # healthy, not ejected, not draining


class Observer:
    """Polls /admin/replicas so a report can say when a replica left and rejoined rotation."""

    def __init__(self, gateway_url: str, interval_s: float = 0.05) -> None:
        self._url = f"{gateway_url}/admin/replicas"
        self._interval_s = interval_s
        self.seen: list[Observation] = []

    async def run(self) -> None:
        async with aiohttp.ClientSession(headers=ADMIN) as client:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with client.get(self._url) as response:
                        state = await response.json()
                    now = time.monotonic()
                    for r in state["replicas"]:
                        ok = r["healthy"] and not r["ejected"] and not r["draining"]
                        self.seen.append(Observation(now, r["url"], ok))
                await asyncio.sleep(self._interval_s)

    def first(self, url: str, in_rotation: bool, after: float) -> float | None:
        return next(
            (
                o.at
                for o in self.seen
                if o.url == url and o.in_rotation == in_rotation and o.at >= after
            ),
            None,
        )


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    box = [time.monotonic()]
    yield box
    box.append(time.monotonic())
