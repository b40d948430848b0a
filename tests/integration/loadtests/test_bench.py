"""`infergate bench` end to end on its smallest configuration: real replicas, gateway and
Locust. Checks the artefacts are produced and well-formed; asserts nothing about timings."""

from __future__ import annotations

import csv
import gzip
import subprocess
from pathlib import Path

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
    lor = next(r for r in summary if r["strategy"] == "least_outstanding_requests")
    assert float(lor["p99_change_low"]) <= float(lor["p99_change"]) <= float(lor["p99_change_high"])

    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2

    table = (out / "table.md").read_text()
    assert "### P99 end-to-end latency (s)" in table
    assert "### Throughput per minute per instance" in table
    assert "| 1 | 2 | 1 |" in table and "least_outstanding_requests vs random" in table
    assert "infergate bench --scenarios 2/1" in table  # the exact command is recorded

    for chart in ("p99_vs_instances.png", "throughput_per_instance_vs_instances.png"):
        data = (out / chart).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000

    samples = sorted((out / "samples").glob("*.csv.gz"))
    assert len(samples) == 2
    header = gzip.decompress(samples[0].read_bytes()).decode().splitlines()[0]
    assert header.startswith("start_unix,end_unix,kind,ok")
    assert "Traceback" not in result.stderr
