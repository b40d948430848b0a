"""A local cluster's replicas: the cluster file, and N replica processes supervised as children
of this one (one GPU each via CUDA_VISIBLE_DEVICES when GPUs exist). `infergate up`
(gateway/app/cli.py) runs the gateway in front of them; the benchmark starts its replicas here too.

Replicas are started as `python -m replica`, never imported (no torch here). When they are
stopped every one gets SIGTERM and then SIGKILL; children also get SIGTERM from the kernel if
this process dies, so none is left behind.

`infergate up` serves tiny-gpt with the weights trained on the standard library's docstrings
that ship with the replica package (replica/models/train_tiny_gpt.py), so a first completion
reads like text; a cluster built in code (benchmarks, tests) keeps the seeded random weights.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ConfigError
from gateway.yamlfile import load_yaml

READY_TIMEOUT_S = 180.0
# Deferred jobs are on in a local cluster; the store outlives a restart of `infergate up`.
DEFAULT_JOB_STORE = Path(tempfile.gettempdir()) / "infergate" / "jobs.db"
PR_SET_PDEATHSIG = 1
TRAINED_TINY_GPT = ("models", "trained", "tiny-gpt.pt")  # inside the replica package

log = logging.getLogger("gateway")


class ReplicaGroup(BaseModel):
    """Replicas started alike: how many, which of their configured models they serve (by name;
    empty: all), and their replica YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    replicas: int = Field(1, ge=1, le=64)
    models: tuple[str, ...] = ()
    replica_config: Path | None = None


class ClusterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    replicas: int = Field(2, ge=1, le=64)
    models: tuple[str, ...] = ()  # served model names every replica keeps (replica --model)
    engine: str = Field("torch", pattern="^(torch|simulated)$")
    replica_config: Path | None = None  # a replica YAML passed to every replica with -c
    # Several kinds of replica instead of `replicas` x one kind, e.g. two models side by side.
    groups: tuple[ReplicaGroup, ...] = ()
    host: str = "127.0.0.1"
    first_replica_port: int = Field(9001, ge=1, le=65535)
    # Replica i publishes its KV cache events on this port + 2i (replay: + 2i + 1), bound to
    # `host`; the gateway follows them when the strategy is precise_prefix. None: off.
    kv_events_port: int | None = Field(5557, ge=1, le=65000)
    # The gateway's own YAML minus `replicas` (listen, routing, timeouts, health_check, ...).
    gateway: dict[str, Any] = Field(default_factory=dict)
    # tiny-gpt's weights on torch replicas without a replica_config: seeded "random" ones, or
    # the "trained" ones shipped with the replica package (load_cluster's default).
    tiny_gpt_weights: Literal["random", "trained"] = "random"

    @property
    def members(self) -> list[ReplicaGroup]:
        """The group of each replica, in port order."""
        groups = self.groups or (
            ReplicaGroup(
                replicas=self.replicas, models=self.models, replica_config=self.replica_config
            ),
        )
        return [group for group in groups for _ in range(group.replicas)]

    @property
    def size(self) -> int:
        return len(self.members)


def load_cluster(path: Path | None, args: argparse.Namespace) -> ClusterConfig:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        data = load_yaml(text) or {}  # its aliases bounded, its errors quoting no secret
        if not isinstance(data, dict):
            raise ConfigError(f"(top level): expected a mapping, got {type(data).__name__}")
    if (args.replicas is not None or getattr(args, "model", None)) and data.get("groups"):
        raise ConfigError("--replicas/--model: the cluster file has groups; edit those instead")
    if args.replicas is not None:
        data["replicas"] = args.replicas
    if getattr(args, "model", None):
        data["models"] = list(args.model)
    if args.engine is not None:
        data["engine"] = args.engine
    data.setdefault("tiny_gpt_weights", "trained")  # `infergate up`: a first answer that reads
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{where}: {first['msg']}") from None


def gateway_yaml(cluster: ClusterConfig, args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "routing": {"strategy": "least_outstanding_requests"},
        "health_check": {"path": "/ping", "interval_s": 1.0, "timeout_s": 1.0},
        "jobs": {"store": str(DEFAULT_JOB_STORE)},
        **cluster.gateway,
    }
    if args.strategy is not None:
        config["routing"] = {**config.get("routing", {}), "strategy": args.strategy}
    if args.port is not None:
        config["listen"] = {**config.get("listen", {}), "port": args.port}
    config["replicas"] = [{"url": url} for url in replica_urls(cluster)]
    if cluster.kv_events_port is not None:
        for index, replica in enumerate(config["replicas"]):
            endpoint, replay = kv_endpoints(cluster, index)
            replica["kv_events"] = {"endpoint": endpoint, "replay_endpoint": replay}
        routing = config["routing"] = dict(config.get("routing") or {})
        prefix = routing["prefix"] = dict(routing.get("prefix") or {})
        prefix.setdefault("events", {})
    return config


def kv_endpoints(cluster: ClusterConfig, index: int) -> tuple[str, str]:
    """Where replica `index` publishes its KV cache events, and replays them."""
    port = (cluster.kv_events_port or 0) + 2 * index
    return f"tcp://{cluster.host}:{port}", f"tcp://{cluster.host}:{port + 1}"


def trained_weights() -> Path | None:
    """The trained tiny-gpt weights in the installed replica package, found without importing
    it; None when either is missing."""
    spec = importlib.util.find_spec("replica")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *TRAINED_TINY_GPT)
    return path if path.is_file() else None


def default_replica_yaml(cluster: ClusterConfig) -> dict[str, Any] | None:
    """The replica YAML of replicas without a replica_config: None (the replica's built-in
    models) unless tiny-gpt's trained weights are asked for, torch runs it and they exist."""
    if cluster.tiny_gpt_weights == "random" or cluster.engine != "torch":
        return None
    weights = trained_weights()
    if weights is None:
        log.warning("no trained tiny-gpt weights in the replica package: random ones it is")
        return None
    # The replica's built-in models (replica/cli.py); trained weights emit any byte they like.
    params = {"weights_path": str(weights), "ascii_only": False}
    return {"models": [{"kind": "tiny-gpt", "params": params}, {"kind": "classifier"}]}


def gpu_count() -> int:
    """GPUs without importing torch: nvidia-smi when present, else none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_replica(
    cluster: ClusterConfig,
    index: int,
    gpus: int,
    output: IO[bytes] | None = None,
    extra_args: Sequence[str] = (),
    default_config: Path | None = None,
) -> subprocess.Popen[bytes]:
    """`default_config`: the replica YAML of a group without its own replica_config."""
    port = cluster.first_replica_port + index
    group = cluster.members[index]
    cmd = [sys.executable, "-m", "replica", "--host", cluster.host, "--port", str(port)]
    cmd += ["--engine", cluster.engine]
    replica_config = group.replica_config or default_config
    if replica_config is not None:
        cmd += ["-c", str(replica_config)]
    for model in group.models:
        cmd += ["--model", model]
    if cluster.kv_events_port is not None:
        endpoint, replay = kv_endpoints(cluster, index)
        events = {"enable_kv_cache_events": True, "publisher": "zmq", "bind": True}
        events |= {"endpoint": endpoint, "replay_endpoint": replay}
        cmd += ["--kv-events-config", json.dumps(events)]
    cmd += extra_args
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    preexec = die_with_parent if sys.platform == "linux" else None
    # preexec_fn only sets the parent-death signal; no threads run when replicas start.
    return subprocess.Popen(
        cmd,
        env=env,
        preexec_fn=preexec,  # noqa: PLW1509
        stdout=output,
        stderr=output,
    )


async def wait_ready(urls: list[str], procs: list[subprocess.Popen[bytes]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    pending = dict(zip(urls, procs, strict=True))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
        while pending:
            for url, proc in list(pending.items()):
                if proc.poll() is not None:
                    raise RuntimeError(f"replica {url} exited with code {proc.returncode}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with client.get(f"{url}/ping") as response:
                        if response.status == 200:
                            del pending[url]
            if loop.time() > deadline:
                raise RuntimeError(f"replicas not ready after {READY_TIMEOUT_S:.0f} s: {pending}")
            await asyncio.sleep(0.2)


def stop_all(procs: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def replica_urls(cluster: ClusterConfig) -> list[str]:
    return [f"http://{cluster.host}:{cluster.first_replica_port + i}" for i in range(cluster.size)]


@contextlib.contextmanager
def replicas_running(
    cluster: ClusterConfig,
    output: IO[bytes] | None = None,
    extra_args: Mapping[int, Sequence[str]] | None = None,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`extra_args`: more command-line arguments for some replicas, by index."""
    gpus = gpu_count()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="infergate-replicas-") as workdir:
        default_config = write_default_replica_yaml(cluster, Path(workdir))
        try:
            for i in range(cluster.size):
                extra = (extra_args or {}).get(i, ())
                procs.append(start_replica(cluster, i, gpus, output, extra, default_config))
            yield procs
        finally:
            stop_all(procs)


def write_default_replica_yaml(cluster: ClusterConfig, workdir: Path) -> Path | None:
    config = default_replica_yaml(cluster)
    if config is None:
        return None
    path = workdir / "replica.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


def banner(url: str, config_path: Path) -> str:
    example = (
        f"curl -s {url}/v1/completions -H 'Content-Type: application/json' "
        """-d '{"model": "tiny-gpt", "prompt": "Hello", "max_tokens": 16}'"""
    )
    return (
        f"\ninfergate is up: {url}\n"
        f"  try:    {example}\n"
        f"  jobs:   infergate jobs submit batch.jsonl --wait --url {url}\n"
        f"  config: {config_path} (edit it; the gateway reloads without a restart)\n"
        f"  stop:   Ctrl-C\n"
    )
