"""No secret reaches the replica's log: requests aiohttp's HTTP parser refuses (bare LF, control
bytes, bad chunk framing, an invalid URL) are answered 400 and logged by their error class and a
short reason, never with the request's bytes, which carry the client's API key (a gateway in
front forwards Authorization; a client may reach a replica directly)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import free_port, stop, wait_http_ok

API_KEY = "sk-REPLICASECRET-9b3e1d"

MALFORMED = {
    "bare LF": f"GET /v1/models HTTP/1.1\nHost: x\nAuthorization: Bearer {API_KEY}\n\n",
    "control byte in the key's line": (
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\x01\r\n\r\n"
    ),
    "NUL in a later header": (
        f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\nX-Trace: a\x00b\r\n\r\n"
    ),
    "control byte in the path": (
        f"GET /v1/models\x7f HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\n\r\n"
    ),
    "bad method": f"G\x01T /v1/models HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\n\r\n",
    "bad chunk framing": (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        f"Authorization: Bearer {API_KEY}\r\n\r\nzz{API_KEY}\r\n"
    ),
}

CONFIG = "engine: {kind: simulated}\nmodels:\n  - kind: tiny-gpt\n"


async def _exchange(port: int, raw: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw.encode("latin-1"))
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)  # the replica closes after a 400
    finally:
        writer.close()


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
async def test_malformed_requests_get_400_and_leave_no_secret_in_the_log(
    tmp_path: Path, log_level: str
) -> None:
    port = free_port()
    config = tmp_path / "replica.yaml"
    config.write_text(CONFIG)
    log = tmp_path / "replica.log"
    command = [sys.executable, "-m", "replica", "-c", str(config), "--port", str(port)]
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [*command, "--log-level", log_level], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        await wait_http_ok(f"http://127.0.0.1:{port}/ping", proc, timeout_s=60)
        answers = {case: await _exchange(port, raw) for case, raw in MALFORMED.items()}
    finally:
        code = stop(proc)
    output = log.read_text(errors="replace")
    assert code == 0, output
    for case, answer in answers.items():
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), (case, answer[:200])
    assert API_KEY not in output and "REPLICASECRET" not in output, output
    # Each refusal is still logged by its class and reason, one line each (a bad method on a
    # connection's first request only at debug: aiohttp's choice, as port scanners send them).
    logged = output.count("Error handling request from 127.0.0.1: malformed request: ")
    assert logged == len(MALFORMED) - (log_level == "INFO"), output
    assert "InvalidURLError: Invalid char in url path" in output
    assert "Traceback" not in output, output
