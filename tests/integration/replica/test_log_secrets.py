"""No secret reaches the replica's log: requests aiohttp's HTTP parser refuses (bare LF, control
bytes, bad chunk framing, an invalid URL) are answered 400 and logged by their error class and a
short reason, never with the request's bytes, which carry the client's API key (a gateway in
front forwards Authorization; a client may reach a replica directly)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.processes import REPLICA_CONFIG, replica_process
from tests.support.raw_http import assert_json_refusal, malformed_requests, read_until_close

API_KEY = "sk-REPLICASECRET-9b3e1d"

MALFORMED = malformed_requests(API_KEY)


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
async def test_malformed_requests_get_400_and_leave_no_secret_in_the_log(
    tmp_path: Path, log_level: str
) -> None:
    flags = ("--log-level", log_level)
    async with replica_process(tmp_path, {}, REPLICA_CONFIG, *flags) as (port, log):
        answers = {case: await read_until_close(port, raw) for case, raw in MALFORMED.items()}
    output = log.read_text(errors="replace")
    for case, answer in answers.items():
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), (case, answer[:200])
        assert_json_refusal(answer, 400, API_KEY)
    assert API_KEY not in output and "REPLICASECRET" not in output, output
    # Each refusal is still logged by its class and reason, one line each (a bad method on a
    # connection's first request only at debug: aiohttp's choice, as port scanners send them).
    logged = output.count("Error handling request from 127.0.0.1: malformed request: ")
    assert logged == len(MALFORMED) - (log_level == "INFO"), output
    assert "InvalidURLError: Invalid char in url path" in output
    assert "Traceback" not in output, output
