"""No secret reaches the gateway's log: requests aiohttp's HTTP parser refuses (bare LF, control
bytes, an over-long line, a bad method) are answered 400 and logged by their error class and a
short reason, never with the request's bytes, which carry API keys and the admin token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.processes import free_port, stop, wait_http_ok
from tests.support.raw_http import assert_json_refusal, malformed_requests, read_until_close
from tests.support.servers import fake_replicas

API_KEY = "sk-LOGSECRET-4f1c9a"
ADMIN_TOKEN = "ADMINSECRET-77d2e0"
PAD = "p" * 1500  # past limits.max_header_bytes below: one header line over the limit

MALFORMED = {
    **malformed_requests(API_KEY, "/admin/replicas", ADMIN_TOKEN),
    "header line too long": (
        f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {API_KEY}{PAD}\r\n\r\n"
    ),
}


@pytest.mark.parametrize("log_level", ["info", "debug"])
async def test_malformed_requests_get_400_and_leave_no_secret_in_the_log(
    tmp_path: Path, log_level: str
) -> None:
    port = free_port()
    async with fake_replicas(1) as (replica,):
        path = tmp_path / "g.yaml"
        config = {
            "listen": {"port": port},
            "replicas": [{"url": replica.url}],
            "auth": {"api_keys": [{"name": "team-a", "key": API_KEY}]},
            "limits": {"max_header_bytes": 1024},
        }
        path.write_text(yaml.safe_dump(config))
        log = tmp_path / "gateway.log"
        env = {**os.environ, "INFERGATE_ADMIN_TOKEN": ADMIN_TOKEN}
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "-c", str(path), "--log-level", log_level],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            await wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc)
            answers = {case: await read_until_close(port, raw) for case, raw in MALFORMED.items()}
        finally:
            code = stop(proc)
    output = log.read_text(errors="replace")
    assert code == 0, output
    for case, answer in answers.items():
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), (case, answer[:200])
        assert_json_refusal(answer, 400, API_KEY, ADMIN_TOKEN)
    assert API_KEY not in output and ADMIN_TOKEN not in output, output
    assert "LOGSECRET" not in output and "ADMINSECRET" not in output, output
    # Each refusal is still logged by its class and reason, one line each (a bad method on a
    # connection's first request only at debug: aiohttp's choice, as port scanners send them).
    logged = output.count("Error handling request from 127.0.0.1: malformed request: ")
    assert logged == len(MALFORMED) - (log_level == "info"), output
    assert "InvalidURLError: Invalid char in url path" in output
    assert "Traceback" not in output, output
