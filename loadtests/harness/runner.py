"""One benchmark run: a gateway with one strategy in front of running replicas, a load
generator for a fixed time, and the raw samples it recorded, with the machine's CPU sampled
throughout so a saturated load generator or machine is flagged, not silently reported."""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
import yaml

from loadtests.analysis.stats import percentile
from loadtests.load.samples import Sample, read_samples
from loadtests.load.scenarios import INSTANCE_CONCURRENCY
from loadtests.load.workload import Workload

REPO = Path(__file__).resolve().parents[2]
SATURATED_PERCENT = 90.0
GENERATOR_TAIL_S = 1.0  # the load generator runs this long past the window, so it ends sending


def replica_config(engine: str, max_queue: int = 4096) -> dict[str, object]:
    """The benchmarks' replica: tiny-gpt behind continuous batching of INSTANCE_CONCURRENCY
    sequences (as an A10G holds a 7B model's), a queue of `max_queue`, no queue timeout that a
    run would meet."""
    batcher = {
        "kind": "continuous",
        "max_num_seqs": INSTANCE_CONCURRENCY,
        "max_batch_tokens": 8192,
        "max_queue": max_queue,
        "queue_timeout_ms": 600_000,
    }
    model = {
        "kind": "tiny-gpt",
        "max_tokens_limit": 1024,
        "batcher": batcher,
        "params": {"context_len": 2048},
    }
    return {"engine": {"kind": engine}, "models": [model]}


@dataclass(frozen=True)
class RunSpec:
    users: int
    instances: int
    strategy: str
    seed: int
    warmup_s: float
    duration_s: float
    workload: Workload
    open_loop_rate: float | None = None  # requests/s in total; None = closed loop (Locust)


@dataclass
class CpuSample:
    machine: list[float] = field(default_factory=list)
    generator: list[float] = field(default_factory=list)
    gateway: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    samples: list[Sample]
    window_start: float
    cpu_machine_mean: float
    cpu_generator_p90: float
    cpu_gateway_p90: float

    @property
    def saturated(self) -> bool:
        return (
            self.cpu_machine_mean > SATURATED_PERCENT or self.cpu_generator_p90 > SATURATED_PERCENT
        )


def free_port_block(n: int, start: int = 20000) -> int:
    """The first port of n consecutive free loopback ports."""
    import socket

    base = start + (os.getpid() % 200) * 50
    while True:
        socks = []
        try:
            for port in range(base, base + n + 1):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            base += n + 1
        finally:
            for sock in socks:
                sock.close()


def exit_on_sigterm() -> None:
    """SIGTERM ends a benchmark as Ctrl-C does: through every `finally`, so the replicas, front
    ends and load generators it started are stopped, not left running. A SIGTERM that lands
    while a child is being started (inside `subprocess.Popen`, before any `finally` holds it)
    would leave that child behind: at exit, every child still running is stopped too. SIGUSR1
    prints every thread's stack to stderr (a benchmark that seems stuck says where)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    atexit.register(stop_children)


def stop_children(grace_s: float = 10.0) -> None:
    """Stop every process this one started that is still running: SIGTERM, then SIGKILL for
    those still there after `grace_s`."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def gateway_process(
    replica_urls: list[str],
    strategy: str,
    seed: int,
    port: int,
    workdir: Path,
    log: IO[bytes],
    extra: dict[str, Any] | None = None,
) -> Iterator[tuple[str, int]]:
    """A gateway process with this strategy; yields its URL and pid once it is ready."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "routing": {"strategy": strategy, "seed": seed},
        "replicas": [{"url": url} for url in replica_urls],
        "reload": {"watch": False},
        "timeouts": {"idle_s": 120, "first_byte_s": 120},
    }
    config.update(extra or {})
    path = workdir / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "gateway", "-c", str(path), "--log-level", "warning"]
    with front_end_process(cmd, port, "/readyz", log) as front:
        yield front


@contextlib.contextmanager
def front_end_process(
    cmd: list[str], port: int, ready_path: str, log: IO[bytes]
) -> Iterator[tuple[str, int]]:
    """Run `cmd` (listening on `port`) until the block ends; yields its URL and pid once
    `ready_path` answers 200."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}{ready_path}")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


HAPROXY_CONFIG = """\
global
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    option http-keep-alive
frontend bench
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance {balance}
    option httpchk GET /ping
{servers}
"""


def haproxy_available() -> bool:
    return shutil.which("haproxy") is not None


@contextlib.contextmanager
def haproxy_process(
    replica_urls: list[str], balance: str, port: int, workdir: Path, log: IO[bytes]
) -> Iterator[tuple[str, int]]:
    """HAProxy in front of the same replicas (`balance leastconn`, `random(2)`, ...)."""
    servers = "\n".join(
        f"    server r{i} {url.removeprefix('http://')} maxconn 1000"
        for i, url in enumerate(replica_urls)
    )
    path = workdir / f"haproxy-{port}.cfg"
    path.write_text(HAPROXY_CONFIG.format(port=port, balance=balance, servers=servers))
    with front_end_process(["haproxy", "-db", "-f", str(path)], port, "/v1/models", log) as front:
        yield front


def _sample_cpu(pids: dict[str, int], stop: threading.Event, out: CpuSample) -> None:
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    psutil.cpu_percent(None)
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)
    while not stop.wait(0.5):
        out.machine.append(psutil.cpu_percent(None))
        for name, proc in procs.items():
            with contextlib.suppress(psutil.Error):
                getattr(out, name).append(proc.cpu_percent(None))


def _generator_cmd(spec: RunSpec, url: str, samples: Path) -> list[str]:
    """`url`: one front end, or several joined by commas (the load is split among them)."""
    run_s = spec.warmup_s + spec.duration_s + GENERATOR_TAIL_S
    if spec.open_loop_rate is not None:
        return [
            sys.executable,
            "-m",
            "loadtests.load.openloop",
            "--host",
            url,
            "--rate",
            str(spec.open_loop_rate),
            "--seconds",
            str(run_s),
            "--samples",
            str(samples),
        ]
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(REPO / "loadtests" / "load" / "locustfile.py"),
        "--headless",
        "-u",
        str(spec.users),
        "-r",
        str(spec.users),
        "-t",
        f"{run_s:.0f}s",
        "--host",
        url.split(",", maxsplit=1)[0],
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--stop-timeout",
        "0",
        "CompletionUser",
    ]


def run_load(
    spec: RunSpec, url: str, gateway_pids: list[int], workdir: Path, log: IO[bytes]
) -> RunResult:
    samples_path = workdir / "samples.csv"
    samples_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "INFERGATE_BENCH_SAMPLES": str(samples_path),
        "INFERGATE_BENCH_WORKLOAD": spec.workload.to_env(),
        "INFERGATE_BENCH_HOSTS": url,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        _generator_cmd(spec, url, samples_path), env=env, stdout=log, stderr=log, cwd=REPO
    )
    cpu = CpuSample()
    stop = threading.Event()
    pids = {"generator": proc.pid} | ({"gateway": gateway_pids[0]} if gateway_pids else {})
    sampler = threading.Thread(target=_sample_cpu, args=(pids, stop, cpu), daemon=True)
    sampler.start()
    try:
        proc.wait(spec.warmup_s + spec.duration_s + 120)
    finally:
        stop.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode not in (0, 1) or not samples_path.exists():  # locust exits 1 on failures
        raise RuntimeError(f"load generator failed (exit {proc.returncode}); see the run log")
    samples = read_samples(samples_path)
    first = min((s.start_unix for s in samples), default=time.time())
    return RunResult(
        spec,
        samples,
        first + spec.warmup_s,
        _mean(cpu.machine),
        percentile(cpu.generator, 90),
        percentile(cpu.gateway, 90),
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
