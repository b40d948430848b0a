"""`workers: N`: N gateway processes on one port, sharing exact outstanding counts.

The supervisor (the process `infergate gateway` starts as) binds the listening socket once and
starts N workers, `python -m gateway` with the socket's descriptor inherited: each accepts on
it, as nginx's workers do. It creates what they share, and removes it when it stops:
- the counts (gateway/shared.py): one row per worker, one column per replica; a worker routes by
  column sums, so least-outstanding is exact across workers;
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
from dataclasses import dataclass
from pathlib import Path

from gateway.cluster import die_with_parent
from gateway.shared import SharedCounts

log = logging.getLogger("gateway")

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
DRAIN_GRACE_S = 35.0  # a worker's own drain (30 s) and its exit
RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
YOUNG_S = 10.0  # a worker that dies younger than this backs off further


@dataclass(frozen=True)
class Worker:
    """What a worker process is handed by its supervisor."""

    index: int
    count: int
    listen_fd: int
    counts: SharedCounts
    metrics_dir: str
    jobs_socket: str  # worker 0 serves the jobs endpoints here too; the others pass them on


def worker_args(parser: argparse.ArgumentParser) -> None:
    """The supervisor's arguments to a worker (not for people)."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # INDEX/COUNT
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shared", help=argparse.SUPPRESS)  # NAME:LOCK_PATH
    parser.add_argument("--jobs-socket", help=argparse.SUPPRESS)


def worker_from_args(args: argparse.Namespace) -> Worker | None:
    if not getattr(args, "worker", None):
        return None
    index, count = (int(x) for x in args.worker.split("/"))
    name, lock = args.shared.split(":", 1)
    counts = SharedCounts(name, count, index, lock_path=Path(lock))
    return Worker(index, count, args.listen_fd, counts, os.environ[METRICS_ENV], args.jobs_socket)


def worker_count(configured: int | str) -> int:
    if configured == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return int(configured)


class Supervisor:
    def __init__(self, config_path: Path, host: str, port: int, count: int, log_level: str) -> None:
        self._config_path, self._count, self._log_level = config_path, count, log_level
        self._socket = socket.create_server((host, port), backlog=1024)
        self._socket.set_inheritable(True)
        self._workdir = Path(tempfile.mkdtemp(prefix="infergate-workers-"))
        (self._workdir / "metrics").mkdir()
        self._counts = SharedCounts(
            f"infergate-{os.getpid()}-{int(time.time())}", count, 0,
            lock_path=self._workdir / "counts.lock", create=True,
        )  # fmt: skip
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._started = [0.0] * count
        self._deaths = [0] * count

    @property
    def address(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"{host}:{port}"

    def _start(self, index: int) -> None:
        cmd = [
            sys.executable, "-m", "gateway", "-c", str(self._config_path),
            "--log-level", self._log_level, "--worker", f"{index}/{self._count}",
            "--listen-fd", str(self._socket.fileno()),
            "--shared", f"{self._counts.name}:{self._workdir / 'counts.lock'}",
            "--jobs-socket", str(self._workdir / "jobs.sock"),
        ]  # fmt: skip
        env = {**os.environ, METRICS_ENV: str(self._workdir / "metrics")}
        # A worker gets SIGTERM if the supervisor dies (kill -9 included): none is orphaned
        # holding the port. preexec_fn only sets that; no threads run in the supervisor.
        self._procs[index] = subprocess.Popen(
            cmd,
            pass_fds=(self._socket.fileno(),),
            env=env,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)
                now = time.monotonic()
                for index, proc in enumerate(self._procs):
                    if proc is not None and proc.poll() is not None and not stop.is_set():
                        restarts[index] = now + self._died(index, proc)
                        self._procs[index] = None
                for index, at in list(restarts.items()):
                    if now >= at and not stop.is_set():
                        del restarts[index]
                        self._start(index)
            return await self._stop()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._cleanup()

    def _died(self, index: int, proc: subprocess.Popen[bytes]) -> float:
        """A worker exited on its own: forget its counts; the back-off before its restart."""
        from prometheus_client import multiprocess

        self._counts.clear_row(index)
        multiprocess.mark_process_dead(proc.pid, str(self._workdir / "metrics"))  # type: ignore[no-untyped-call]
        young = time.monotonic() - self._started[index] < YOUNG_S
        self._deaths[index] = self._deaths[index] + 1 if young else 0
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
            await asyncio.wait_for(asyncio.gather(*waits), DRAIN_GRACE_S)
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
        self._socket.close()
        self._counts.close()
        self._counts.unlink()
        shutil.rmtree(self._workdir, ignore_errors=True)
