"""Helpers for tests that run our commands as real OS processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

BIN = Path(sys.executable).parent
REPLICA_CONFIG = "engine: {kind: simulated}\nmodels:\n  - kind: tiny-gpt\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    """Poll until `url` answers 200; fail early if the process died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as client:
        while True:
            assert proc.poll() is None, f"process exited with {proc.returncode}"
            try:
                async with client.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert loop.time() < deadline, f"{url} did not come up"
            await asyncio.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@asynccontextmanager
async def replica_process(
    tmp_path: Path, env: dict[str, str], config_text: str = REPLICA_CONFIG, *args: str
) -> AsyncIterator[tuple[int, Path]]:
    """A replica process on a free port, `args` added to its command line and `env` to the
    environment; yields (port, its log), stopped with exit 0."""
    port = free_port()
    config = tmp_path / "replica.yaml"
    config.write_text(config_text)
    log = tmp_path / "replica.log"
    command = [sys.executable, "-m", "replica", "-c", str(config), "--port", str(port), *args]
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        await wait_http_ok(f"http://127.0.0.1:{port}/ping", proc, timeout_s=60)
        yield port, log
    finally:
        code = stop(proc)
    assert code == 0, log.read_text(errors="replace")


async def start_replica(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replica", *args, "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    assert line.startswith("replica listening on "), line
    return process, line.split()[-1]


async def wait_replica_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(600):
        async with session.get(f"{url}/ping") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("replica never became ready")
