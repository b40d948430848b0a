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


LEAKY_BENCH = """
import subprocess, sys, time
from loadtests.harness.runner import exit_on_sigterm
exit_on_sigterm()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_no_finally_holds_is_stopped_when_the_benchmark_exits() -> None:
    """A SIGTERM that lands while a child starts leaves it out of every `finally`; the exit
    hook stops it all the same (here no `finally` knows the child at all)."""
    bench = subprocess.Popen([sys.executable, "-c", LEAKY_BENCH], stdout=subprocess.PIPE)
    try:
        assert bench.stdout is not None
        child = psutil.Process(int(bench.stdout.readline()))
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM
        assert not child.is_running()
    finally:
        bench.kill()
        bench.wait()
        if bench.stdout is not None:
            bench.stdout.close()
