"""The acceptance drill for durable jobs: kill -9 a real gateway process in the middle of a
2,000-line batch, start it again on the same store, and every line has exactly one result."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.jobs.sqlite import JobStore
from tests.support.processes import free_port, stop, wait_http_ok
from tests.support.servers import fake_replicas, get_json, lines_done

LINES = 2000


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", "-c", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def _start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "-c", str(config)], stdout=out, stderr=out
        )


async def test_kill_9_mid_batch_then_restart_every_line_has_exactly_one_result(
    tmp_path: Path,
) -> None:
    lines = [
        {"custom_id": f"c{i}", "url": "/v1/completions", "body": {"prompt": f"p{i}"}}
        for i in range(LINES - 1)
    ]
    # The first line is answered only when the test says so: in flight whenever the kill comes.
    lines.insert(0, {"custom_id": "held", "url": "/hold", "body": {}})
    data = "\n".join(json.dumps(line) for line in lines).encode()
    log = tmp_path / "gateway.log"
    async with fake_replicas(2) as replicas, aiohttp.ClientSession() as client:
        port = free_port()
        config = tmp_path / "g.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"port": port},
                    "replicas": [{"url": r.url} for r in replicas],
                    "jobs": {"store": str(tmp_path / "jobs.db"), "max_outstanding_per_replica": 4},
                }
            )
        )
        base = f"http://127.0.0.1:{port}"
        proc = _start_gateway(config, log)
        try:
            await wait_http_ok(f"{base}/healthz", proc)
            async with client.post(f"{base}/v1/batches", data=data) as response:
                assert response.status == 202
                batch_url = base + response.headers["Location"]
            while lines_done(batch := await get_json(client, batch_url)) < LINES // 5:
                await asyncio.sleep(0.02)
            proc.kill()  # SIGKILL: no clean-up of any kind
            await asyncio.to_thread(proc.wait)
            done_at_kill = lines_done(_batch_from_store(tmp_path / "jobs.db"))
            proc = _start_gateway(config, log)
            await wait_http_ok(f"{base}/healthz", proc)
            for replica in replicas:
                replica.release.set()
            for _ in range(1500):
                batch = await get_json(client, batch_url)
                if batch["status"] == "completed":
                    break
                await asyncio.sleep(0.02)
            async with client.get(f"{batch_url}/results") as response:
                results = [json.loads(line) for line in (await response.text()).splitlines()]
        finally:
            code = stop(proc)
    output = log.read_text()
    assert batch["status"] == "completed", output[-2000:]
    assert done_at_kill < LINES, "the batch finished before the kill: nothing was tested"
    assert "are queued again" in output  # jobs in flight at the kill were recovered
    ids = [r["custom_id"] for r in results]
    assert len(ids) == LINES and set(ids) == {line["custom_id"] for line in lines}
    for result in results:
        assert result["error"] is None and result["response"]["status_code"] == 200
        if result["custom_id"] == "held":
            assert result["response"]["body"]["replica"] in {r.name for r in replicas}
            continue
        sent = json.loads(result["response"]["body"]["body"])
        assert sent == {"prompt": "p" + result["custom_id"][1:]}  # the result of its own request
    assert batch["request_counts"] == {
        "total": LINES, "completed": LINES, "failed": 0, "queued": 0, "running": 0,
    }  # fmt: skip
    assert sum(len(r.seen) for r in replicas) >= LINES - 1  # re-dispatches allowed, results not
    assert code == 0


def _batch_from_store(path: Path) -> dict[str, Any]:
    """The batch as the store holds it after the kill (the gateway is down)."""
    store = JobStore(path, retention_s=60)
    try:
        (batch,), _ = store.list_batches(after=None, limit=1)
        return batch.as_json()
    finally:
        store.close()


async def test_a_second_gateway_on_the_same_store_and_an_unusable_store_exit_2(
    tmp_path: Path,
) -> None:
    store = tmp_path / "jobs.db"
    configs = []
    for name, path in (("a", store), ("b", store), ("dir", tmp_path)):
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"port": free_port()},
                    "replicas": [{"url": "http://127.0.0.1:9"}],
                    "jobs": {"store": str(path)},
                }
            )
        )
        configs.append(config)
    first = _start_gateway(configs[0], tmp_path / "a.log")
    try:
        port = yaml.safe_load(configs[0].read_text())["listen"]["port"]
        await wait_http_ok(f"http://127.0.0.1:{port}/healthz", first)
        second, unusable = [await asyncio.to_thread(_run, config) for config in configs[1:]]
    finally:
        stop(first)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].endswith("is in use by another gateway")
    assert "Unclosed" not in second.stderr, second.stderr
    assert unusable.returncode == 2
    assert f"jobs.store: cannot open {tmp_path}" in unusable.stderr.strip().splitlines()[-1]
