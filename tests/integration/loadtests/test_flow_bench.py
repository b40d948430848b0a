"""`python -m loadtests.flow_bench --only limits` end to end on a tiny run: one simulated
replica, its capacity measured, then one key's tokens_per_minute behind 2 gateways x 2 workers
on a PostgreSQL store the bench starts. Checks the report names its command and that requests
were served through the store's slices; asserts nothing about timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import flow_bench
from loadtests.harness.pgserver import MISSING, find_binaries
from loadtests.harness.plan import recorded_args

pytestmark = pytest.mark.skipif(find_binaries() is None, reason=MISSING)


def test_a_tiny_limits_run_serves_and_refuses_through_two_gateways_on_a_store(
    tmp_path: Path,
) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "loadtests.flow_bench", "--replicas", "1", "--seconds", "2",
           "--warmup", "1", "--only", "limits", "--limit-seconds", "6", "--limit-share", "0.3",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    command = (out / "command.txt").read_text().strip()
    args = recorded_args(command, flow_bench.PROG, flow_bench.parser())
    assert flow_bench.command_of(args) == command
    table = (out / "table.md").read_text()
    assert table.startswith(f"Command: `{command}`")
    assert "### Limits across gateways" in table and "### Fairness" not in table
    served = re.search(r"Requests: (\d+) served, \d+ refused with 429", table)
    assert served is not None and int(served[1]) > 0  # through the store's leased slices
    assert "| 1 | " in table  # the first minute's tokens served
