"""Schemathesis against /openapi.json of a real replica and gateway: no 5xx caused by input,
no hang, no crash (loadtests/fuzz.py; run it with --examples 500 for thousands of cases; the
hand-written hostile inputs are tests/integration/test_hostile_inputs.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from loadtests import fuzz


def test_fuzzing_both_apis_finds_no_server_error_hang_or_crash(tmp_path: Path) -> None:
    codes = fuzz.run(examples=15, workdir=tmp_path)
    log = (tmp_path / "processes.log").read_text()
    assert codes == {
        "replica": 0,
        "gateway": 0,
        "through_gateway": 0,
        "processes_alive": 0,
        "still_serving": 0,
    }, log[-3000:]
    cases = 0
    for report in tmp_path.glob("*-report/*.xml"):
        cases += len(ET.parse(report).getroot().findall(".//testcase"))
    assert cases >= 10  # every documented operation was exercised
    assert "unhandled error" not in log  # our error middlewares never met an exception
    ours = [line for line in log.splitlines() if "/gateway/" in line or "/replica/" in line]
    assert not ours, ours  # no traceback through our code (aiohttp logs bad HTTP framing)
