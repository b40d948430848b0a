"""`infergate bench` end to end on its smallest configuration: real replicas, gateway and
Locust. Checks the artefacts are produced and well-formed; asserts nothing about timings."""

from __future__ import annotations

import csv
import gzip
import subprocess
from pathlib import Path

import pytest

from loadtests.harness.plan import build_plan, parse_command
from tests.support.processes import BIN

STRATEGIES = ("random", "least_outstanding_requests")


def test_smallest_bench_writes_csv_table_and_charts(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [str(BIN / "infergate"), "bench", "--scenarios", "2/1", "--seeds", "1",
           "--warmup", "1", "--duration", "3", "--strategies", ",".join(STRATEGIES),
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    with (out / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert sorted(row["strategy"] for row in summary) == sorted(STRATEGIES)
    for row in summary:
        assert (row["users"], row["instances"], row["runs"]) == ("2", "1", "1")
        assert int(row["requests"]) > 0 and int(row["errors"]) == 0
        assert 0 < float(row["p50_s"]) <= float(row["p90_s"]) <= float(row["p99_s"])
        assert float(row["throughput_per_min_per_instance"]) > 0
        # The load it was offered against the capacity measured on the same replicas.
        assert float(row["offered_rps"]) > 0 and float(row["capacity_rps"]) > 0
        assert float(row["offered_share"]) == pytest.approx(
            float(row["offered_rps"]) / float(row["capacity_rps"]), rel=1e-3
        )
    lor = next(r for r in summary if r["strategy"] == "least_outstanding_requests")
    assert float(lor["p99_change_low"]) <= float(lor["p99_change"]) <= float(lor["p99_change_high"])

    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    with (out / "capacity.csv").open() as f:
        (saturation,) = list(csv.DictReader(f))
    assert (saturation["scenario_users"], saturation["users"]) == ("2", "8")  # 2 per slot
    assert saturation["strategy"] == "saturation" and float(saturation["capacity_rps"]) > 0

    table = (out / "table.md").read_text()
    assert "### P99 end-to-end latency (s)" in table
    assert "### Throughput per minute per instance" in table
    assert "| 1 | 2 | 1 |" in table and "least_outstanding_requests vs random" in table
    # The full command is recorded; it rebuilds the same plan whatever the defaults become.
    command = (out / "command.txt").read_text().strip()
    assert f"Command: `{command}`" in table
    assert "--strategies random,least_outstanding_requests --seeds 1" in command
    assert build_plan(parse_command(command)).strategies == STRATEGIES
    assert "### Offered load and measured capacity" in table
    assert "| 2 | 1 | closed loop, 2 users | - |" in table
    assert "Simulated central queue P99 (s) [95% CI]" in table

    for chart in ("p99_vs_instances.png", "throughput_per_instance_vs_instances.png"):
        data = (out / chart).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000

    samples = sorted((out / "samples").glob("*.csv.gz"))
    assert len(samples) == 3  # two strategies and the saturation run
    header = gzip.decompress(samples[0].read_bytes()).decode().splitlines()[0]
    assert header.startswith("start_unix,end_unix,kind,ok")
    assert "Traceback" not in result.stderr
