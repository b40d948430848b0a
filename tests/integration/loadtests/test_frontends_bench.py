"""`python -m loadtests.frontends_bench` end to end on its smallest run: one repeat of 1 s, direct,
infergate with `workers: 1` and the Python ceiling relay with two processes, real replicas
(nginx when installed, else the rig's upstream) and real load generators. Checks every
measurement came back whole and the table is written; asserts nothing about timings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("hey") is None or shutil.which("wrk") is None,
    reason="hey and wrk are needed (apt-get install hey wrk; make test installs them as root)",
)


def test_smallest_frontends_bench_measures_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "loadtests.frontends_bench", "--repeats", "1", "--seconds", "1",
           "--warmup-s", "1", "--streams", "100,400",
           "--front-ends", "infergate:workers=1,ceiling:workers=2,no-such-router:x",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "unknown front end no-such-router:x" in result.stdout

    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    by = {(r["front_end"], r["scenario"]): r for r in runs}
    assert len(by) == len(runs) == 15  # 3 front ends x 5 scenarios
    for name in ("direct", "infergate:workers=1", "ceiling:workers=2"):
        latency = by[name, "latency"]
        assert latency["requests"] == 1000 and latency["errors"] == 0
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]
        assert by[name, "hey"]["requests"] > 0 and by[name, "hey"]["errors"] == 0
        saturation = by[name, "saturation"]
        assert saturation["req_per_s"] > 0 and saturation["non2xx"] == 0
        for scenario in ("stream_fixed", "stream_saturation"):
            stream = by[name, scenario]
            assert stream["events"] > 0 and stream["errors"] == 0
            assert stream["streams_done"] >= stream["streams"]  # every stream ended in [DONE]
            assert 0 < stream["delay_p50_ms"] <= stream["delay_p99_ms"]
    assert by["infergate:workers=1", "saturation"]["cores"] > 0  # its CPU time was read
    assert by["ceiling:workers=2", "saturation"]["cores"] > 0  # both processes' time

    table = (out / "table.md").read_text()
    assert "### Request relay" in table and "### Streaming relay" in table
    assert "| infergate:workers=1 | +" in table and "| ceiling:workers=2 | +" in table
    assert f"Command: `{(out / 'command.txt').read_text().strip()}`" in table
    rendered = subprocess.run(
        [sys.executable, "-m", "loadtests.frontends_bench", "--render", str(out)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert (out / "table.md").read_text() == table
    assert "### Streaming relay" in rendered.stdout
