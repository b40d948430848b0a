"""Memory per idle client connection: a one-worker gateway's resident set before and after
`--connections` clients connect and send nothing (each held by the lean front,
gateway/app/front.py).

    python -m loadtests.idle_memory [--connections 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from loadtests.harness.runner import free_port_block, wait_http

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
routing: {{strategy: least_outstanding_requests}}
replicas: [{{url: "http://127.0.0.1:{upstream}"}}]
reload: {{watch: false}}
"""


async def hold(port: int, count: int, pid: int) -> tuple[int, int]:
    process = psutil.Process(pid)
    before = process.memory_info().rss
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
    await asyncio.sleep(2)  # every connection accepted and settled
    after = process.memory_info().rss
    for writer in writers:
        writer.close()
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.idle_memory")
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()
    port = free_port_block(2)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.yaml"
        config.write_text(CONFIG.format(port=port, upstream=port + 1))
        rig = [sys.executable, "-m", "loadtests.harness.relay_rig", "upstream"]
        upstream = subprocess.Popen([*rig, "--port", str(port + 1)])
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "-c", str(config), "--log-level", "warning"]
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz")
            before, after = asyncio.run(hold(port, args.connections, gateway.pid))
        finally:
            gateway.terminate()
            upstream.terminate()
            gateway.wait(30)
            upstream.wait(30)
    each = (after - before) / args.connections
    print(
        f"{args.connections} idle connections: RSS {before / 1e6:.1f} -> {after / 1e6:.1f} MB, "
        f"{each:,.0f} bytes each (one worker, {psutil.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
