"""A benchmark stopped with SIGTERM (as `timeout`, a CI runner or Kubernetes stop it) stops
everything it started: replicas, the front end and its load, none left running."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def test_sigterm_stops_the_benchmark_and_every_process_it_started(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "loadtests.prefix_bench", "--replicas", "2", "--loads", "0.5",
           "--seeds", "1", "--warmup-s", "30", "--duration-s", "30", "--workloads", "unique",
           "--front-ends", "least_outstanding_requests",
           "--out", str(tmp_path / "out")]  # fmt: skip
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    parent = psutil.Process(bench.pid)
    try:
        deadline = time.monotonic() + 60
        started: list[psutil.Process] = []
        while time.monotonic() < deadline:  # two replicas and the gateway, under way
            started = parent.children(recursive=True)
            if sum("gateway" in " ".join(p.cmdline()) for p in started) == 1:
                break
            time.sleep(0.2)
        assert len(started) >= 3, [p.cmdline() for p in started]
        bench.send_signal(signal.SIGTERM)
        try:
            code = bench.wait(timeout=60)
        except subprocess.TimeoutExpired:
            bench.send_signal(signal.SIGUSR1)  # its threads' stacks, to say where it is stuck
            time.sleep(1)
            raise AssertionError(_stuck(started, stderr)) from None
        assert code == 128 + signal.SIGTERM, stderr.read_text()[-3000:]
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        for child in parent.children(recursive=True) if bench.poll() is None else ():
            child.kill()
        bench.kill()
        bench.wait()  # reaped here, not left to warn in a later test


def _stuck(started: list[psutil.Process], stderr: Path) -> str:
    """What a benchmark that did not stop was doing: its processes still there, its stacks."""
    alive = []
    for proc in started:
        with contextlib.suppress(psutil.Error):
            alive.append(f"{proc.pid} {proc.status()} {' '.join(proc.cmdline()[:4])}")
    return f"not stopped within 60 s; still running: {alive}\n{stderr.read_text()[-6000:]}"
