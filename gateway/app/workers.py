"""`workers: N`: N gateway processes on one port, sharing exact outstanding counts.

The supervisor (the process `infergate gateway` starts as) starts N workers, `python -m gateway`,
each with a socket of its own bound to the port with SO_REUSEPORT (gateway/app/listener.py), as
nginx's `reuseport` does: the kernel spreads new connections over the workers evenly, whichever
is awake first. A worker's socket lives and dies with it: the kernel stops sending connections
to a worker that exited (those it had not accepted yet are reset), and its replacement gets a
new one. The supervisor holds the port meanwhile with a socket that is bound but never listens.
It creates what the workers share, and removes it when it stops:
- the counts (gateway/pool/shared.py): one row per worker, one column per replica; a worker
  routes by column sums, so least-outstanding is exact across workers;
- prometheus-client's multiprocess directory, so any worker's /metrics sums every worker's
  counters and histograms.

Each worker loads the config, watches it and polls health, discovery and load itself; a reload
by `POST /admin/reload` or `SIGHUP` reaches every worker (the supervisor passes SIGHUP on).
SIGTERM or SIGINT drains all workers (each stops accepting and lets its requests finish, as a
single gateway does) and then removes the shared state. A worker that dies is started again
(after a back-off that grows while it keeps dying young) once its row of counts is cleared, so
the requests it held stop counting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.aio import wait_set
from gateway.app.listener import reuseport_socket
from gateway.cluster import die_with_parent
from gateway.flow.buckets_shared import SharedBuckets
from gateway.flow.service_shared import SharedService
from gateway.pool.shared import SharedCounts

# Held in a starting worker until its handlers are in (serve() unblocks them): a reload or stop
# that comes while it loads is then acted on, not the default action (which kills it).
STARTUP_SIGNALS = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})


def _worker_preexec(supervisor: int) -> Callable[[], None]:
    def preexec() -> None:  # pragma: no cover - runs in the child before exec
        die_with_parent()
        signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_SIGNALS)
        if os.getppid() != supervisor:  # it died before the parent-death signal was set
            os._exit(1)

    return preexec


log = logging.getLogger("gateway")

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
DRAIN_GRACE_S = 35.0  # a worker's own drain (30 s) and its exit
RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
YOUNG_S = 10.0  # a worker that dies younger than this backs off further
MAX_YOUNG_DEATHS = 5  # in a row: the worker cannot start (a broken config, say): give up
CONFIG_ERROR = 2  # a worker's exit code for a config it cannot use


@dataclass(frozen=True)
class Worker:
    """What a worker process is handed by its supervisor."""

    index: int
    count: int
    listen_fd: int
    counts: SharedCounts
    limits: SharedBuckets  # the keys' limits (gateway/flow/buckets_shared.py)
    service: SharedService  # the tenants' service, for fairness (gateway/flow/service_shared.py)
    metrics_dir: str
    jobs_socket: str  # worker 0 serves the jobs endpoints here too; the others pass them on


def worker_args(parser: argparse.ArgumentParser) -> None:
    """The supervisor's arguments to a worker (not for people)."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # INDEX/COUNT
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shared", help=argparse.SUPPRESS)  # NAME:LOCK_PATH
    parser.add_argument("--shared-limits", help=argparse.SUPPRESS)  # NAME:LOCK_PATH
    parser.add_argument("--shared-service", help=argparse.SUPPRESS)  # NAME:LOCK_PATH
    parser.add_argument("--jobs-socket", help=argparse.SUPPRESS)


def worker_from_args(args: argparse.Namespace) -> Worker | None:
    if not getattr(args, "worker", None):
        return None
    index, count = (int(x) for x in args.worker.split("/"))
    name, lock = args.shared.split(":", 1)
    counts = SharedCounts(name, count, index, lock_path=Path(lock))
    name, lock = args.shared_limits.split(":", 1)
    limits = SharedBuckets(name, count, index, lock_path=Path(lock))
    name, lock = args.shared_service.split(":", 1)
    service = SharedService(name, count, index, lock_path=Path(lock), clock=time.monotonic)
    metrics_dir = os.environ[METRICS_ENV]
    return Worker(
        index, count, args.listen_fd, counts, limits, service, metrics_dir, args.jobs_socket
    )


MAX_WORKERS = 64


def worker_count(configured: int | str) -> int:
    """`auto`: the cores this process may run on, at most MAX_WORKERS."""
    if configured == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return max(1, min(MAX_WORKERS, cores))
    return int(configured)


WORKDIR_PREFIX = "infergate-workers-"


def _remove_stale_workdirs() -> None:
    """What supervisors killed with SIGKILL left (their shared memory the kernel's resource
    tracker removed already): the directories of pids no longer running."""
    for path in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = path.name.removeprefix(WORKDIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Supervisor:
    def __init__(self, config_path: Path, host: str, port: int, count: int, log_level: str) -> None:
        self._config_path, self._count, self._log_level = config_path, count, log_level
        # Holds the port (and picks it, for port 0) while workers come and go; never listens,
        # so no connection waits on it.
        self._anchor = reuseport_socket(host, port)
        self._host, self._port = self._anchor.getsockname()[:2]
        _remove_stale_workdirs()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
        (self._workdir / "metrics").mkdir()
        self._counts = SharedCounts(
            f"infergate-{os.getpid()}-{int(time.time())}", count, 0,
            lock_path=self._workdir / "counts.lock", create=True,
        )  # fmt: skip
        self._limits = SharedBuckets(
            f"infergate-limits-{os.getpid()}-{int(time.time())}", count, 0,
            lock_path=self._workdir / "limits.lock", create=True,
        )  # fmt: skip
        self._service = SharedService(
            f"infergate-service-{os.getpid()}-{int(time.time())}", count, 0,
            lock_path=self._workdir / "service.lock", clock=time.monotonic, create=True,
        )  # fmt: skip
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._started = [0.0] * count
        self._deaths = [0] * count

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def _start(self, index: int) -> None:
        listener = reuseport_socket(self._host, self._port)
        try:
            self._spawn(index, listener)
        finally:
            listener.close()  # the worker's copy is the only one: it closes when the worker exits

    def _spawn(self, index: int, listener: socket.socket) -> None:
        cmd = [
            sys.executable, "-m", "gateway", "-c", str(self._config_path),
            "--log-level", self._log_level, "--worker", f"{index}/{self._count}",
            "--listen-fd", str(listener.fileno()),
            "--shared", f"{self._counts.name}:{self._workdir / 'counts.lock'}",
            "--shared-limits", f"{self._limits.name}:{self._workdir / 'limits.lock'}",
            "--shared-service", f"{self._service.name}:{self._workdir / 'service.lock'}",
            "--jobs-socket", str(self._workdir / "jobs.sock"),
        ]  # fmt: skip
        env = {**os.environ, METRICS_ENV: str(self._workdir / "metrics")}
        # A worker gets SIGTERM if the supervisor dies (kill -9 included): none is orphaned
        # holding the port. preexec_fn only sets that; no threads run in the supervisor.
        self._procs[index] = subprocess.Popen(
            cmd,
            pass_fds=(listener.fileno(),),
            env=env,
            preexec_fn=_worker_preexec(os.getpid()) if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        self._started[index] = time.monotonic()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_all)
        try:
            for index in range(self._count):
                self._start(index)
            log.info("infergate gateway: %d workers on %s", self._count, self.address)
            restarts: dict[int, float] = {}
            while not stop.is_set():
                await wait_set(stop, 0.1)
                now = time.monotonic()
                for index, proc in enumerate(self._procs):
                    if proc is not None and proc.poll() is not None and not stop.is_set():
                        delay = self._died(index, proc)
                        self._procs[index] = None
                        if delay is None:  # it cannot start: stop, as one gateway would
                            await self._stop()
                            return proc.returncode or 1
                        restarts[index] = now + delay
                for index, at in list(restarts.items()):
                    if now >= at and not stop.is_set():
                        del restarts[index]
                        self._start(index)
            return await self._stop()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._cleanup()

    def _died(self, index: int, proc: subprocess.Popen[bytes]) -> float | None:
        """A worker exited on its own: forget its counts; the back-off before its restart, or
        None when it cannot start (a config error at start-up, or dying young again and
        again)."""
        from prometheus_client import multiprocess

        self._counts.clear_row(index)
        self._limits.clear_row(index)  # its requests in flight are gone with it
        multiprocess.mark_process_dead(proc.pid, str(self._workdir / "metrics"))  # type: ignore[no-untyped-call]
        young = time.monotonic() - self._started[index] < YOUNG_S
        self._deaths[index] = self._deaths[index] + 1 if young else 0
        if young and (proc.returncode == CONFIG_ERROR or self._deaths[index] >= MAX_YOUNG_DEATHS):
            log.error(
                "gateway worker %d cannot start (exit %s, %d times in a row); stopping",
                index, proc.returncode, self._deaths[index],
            )  # fmt: skip
            return None
        delay = RESTART_BACKOFF_S[min(self._deaths[index], len(RESTART_BACKOFF_S) - 1)]
        log.error(
            "gateway worker %d (pid %d) exited with %s; starting it again in %.1f s",
            index, proc.pid, proc.returncode, delay,
        )  # fmt: skip
        return delay

    def _reload_all(self) -> None:
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    async def _stop(self) -> int:
        log.info("stopping: every worker drains its requests in flight")
        running = [p for p in self._procs if p is not None and p.poll() is None]
        for proc in running:
            proc.terminate()
        waits = [asyncio.to_thread(p.wait) for p in running]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_GRACE_S):
                await asyncio.gather(*waits)
        failed = 0
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            failed += proc.returncode != 0
        return 1 if failed else 0

    def _cleanup(self) -> None:
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self._anchor.close()
        self._counts.close()
        self._counts.unlink()
        self._limits.close()
        self._limits.unlink()
        self._service.close()
        self._service.unlink()
        shutil.rmtree(self._workdir, ignore_errors=True)
