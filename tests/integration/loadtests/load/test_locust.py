"""The Locust benchmark as README runs it against `make run`: the locustfile, headless, with no
workload of ours, against `infergate up` on its default config (torch replicas, default models)
gives no failed request, and the gateway ends with nothing outstanding.

Only the completion users run: the KServe users send a fixed-size input, and with both classes
Locust gives completion users every other index, whose first seeded draws all fit even when the
workload does not; eight completion users reach, on their first two requests, one that the
default model refuses unless the workload is fitted to it."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from loadtests.harness.runner import REPO, free_port_block
from tests.support.processes import BIN, free_port, stop, wait_http_ok

SECONDS = 5


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`infergate up` with its defaults; only the ports and the job store are the test's."""
    port = free_port()
    config = {
        "first_replica_port": free_port_block(2, start=32000),
        "gateway": {"jobs": {"store": str(tmp_path / "jobs.db")}},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    with (tmp_path / "up.log").open("wb") as log:
        cmd = [str(BIN / "infergate"), "up", "-c", str(path), "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc, timeout_s=40)


async def test_locust_against_the_default_system_has_no_failures(
    make_run: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, proc = make_run
    await wait_http_ok(f"{url}/readyz", proc, timeout_s=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_BENCH_")}
    cmd = [sys.executable, "-m", "locust", "-f", "loadtests/load/locustfile.py", "--headless",
           "-u", "8", "-r", "8", "-t", f"{SECONDS}s", "--host", url,
           "--csv", str(tmp_path / "locust"), "--only-summary", "CompletionUser"]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=90
    )
    with (tmp_path / "locust_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    failures = (tmp_path / "locust_failures.csv").read_text()
    assert rows["Aggregated"]["Failure Count"] == "0", failures
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("completion", "completion (stream)"):
        assert int(rows[name]["Request Count"]) > 0, name
    await _nothing_outstanding(url)


async def _nothing_outstanding(url: str, timeout_s: float = 30.0) -> None:
    """Requests Locust left at its stop end at the gateway too (counts back to zero)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as client:
        while True:
            async with client.get(f"{url}/ui/status.json") as response:
                state = await response.json()
            if state["outstanding"] == 0 and state["queued"] == 0:
                return
            assert loop.time() < deadline, state
            await asyncio.sleep(0.1)
