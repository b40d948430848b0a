"""`python -m replica` as a real process: serves, and on SIGTERM drains then exits 0."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp

from tests.support.processes import start_replica as start_process
from tests.support.processes import wait_replica_ready as wait_ready

CONFIG = """\
engine: {kind: simulated}
models:
  - kind: tiny-gpt
    max_tokens_limit: 256
  - kind: classifier
"""


async def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "replica.yaml"
    config.write_text(CONFIG)
    process, url = await start_process("-c", str(config))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url)
            body = {"prompt": "drain", "max_tokens": 60, "stream": True}
            async with session.post(f"{url}/v1/completions", json=body) as stream:
                assert stream.status == 200
                await stream.content.readline()  # first chunk: the request is in flight
                process.send_signal(signal.SIGTERM)
                for _ in range(100):
                    async with session.get(f"{url}/ping") as ping:
                        if ping.status == 503:
                            break
                    await asyncio.sleep(0.02)
                assert ping.status == 503
                rest = await stream.content.read()
            assert rest.rstrip().endswith(b"data: [DONE]")
            assert rest.count(b'"finish_reason": "length"') == 1
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "replica.yaml"
    config.write_text("server: {port: -1}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replica", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert b"server.port" in stderr
