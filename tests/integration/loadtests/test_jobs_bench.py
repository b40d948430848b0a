"""`python -m loadtests.jobs_bench --gateways 2` end to end on a tiny run: two gateway processes
on a PostgreSQL store the bench starts, one simulated replica, 2 s phases, a 6-line batch.
Checks the batch completed, both gateways agree on it, every sample was written and the report
reads back with its command; asserts nothing about timings."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import jobs_bench
from loadtests.harness.pgserver import MISSING, find_binaries

pytestmark = pytest.mark.skipif(find_binaries() is None, reason=MISSING)


def test_a_tiny_two_gateway_jobs_bench_runs_the_batch_on_a_shared_store(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "loadtests.jobs_bench", "--gateways", "2", "--replicas", "1",
           "--seconds", "2", "--rate", "2", "--lines", "6", "--job-tokens", "4",
           "--drain-s", "30", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (out / "table.md").read_text()
    command = (out / "command.txt").read_text().strip()
    assert table.startswith(f"Command: `{command}`")
    assert command == jobs_bench.command_of(jobs_bench.parser().parse_args(command.split()[3:]))
    assert "behind 2 gateway processes" in table and "job store: PostgreSQL " in table
    assert "status completed" in table and "(6 completed, 0 failed;" in table
    assert "every gateway reports the same counts" in table
    summary = [line for line in table.splitlines() if line.startswith("| 2 | PostgreSQL ")]
    assert len(summary) == 1 and "| 1 |" in summary[0]  # one seed
    for name in ("alone.csv", "with_batch.csv"):
        with (out / name).open() as f:
            assert len(list(csv.DictReader(f))) > 0
