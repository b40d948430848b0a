"""The acceptance drill for a shared job store: two gateway processes on one PostgreSQL
database, a 2,000-line batch submitted at the first, the first killed with kill -9 midway. The
second finishes the batch: every line has exactly one result, only the jobs the killed gateway
held were sent again, none ran twice to completion at the replicas (a re-run goes back to the
replica that had it, which answers from its Idempotency-Key cache when it had finished), and
both gateways report the same counts.

The replicas are the replica's own Idempotency-Key middleware (replica/idempotency.py) in front
of a stand-in for the model that counts what it ran to completion."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml
from aiohttp import web

from replica.idempotency import AnswerCache, middleware
from tests.support.processes import free_port, stop, wait_http_ok
from tests.support.servers import get_json, lines_done, serve

LINES = 2000
PER_REPLICA = 4  # jobs.max_outstanding_per_replica
ADMIN = "drill"


@dataclass
class CountingReplica:
    """Counts, per job id (X-Request-Id), the runs it completed (answered to a gateway still
    connected; a run whose gateway went away is cancelled, as the replica's handlers are) and
    the answers it sent again from its Idempotency-Key cache."""

    url: str = ""
    completed: collections.Counter[str] = field(default_factory=collections.Counter)
    replayed: int = 0

    def _replayed(self) -> None:
        self.replayed += 1

    def app(self) -> web.Application:
        async def complete(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            await asyncio.sleep(0.01)  # the work; cancelled if the gateway goes away
            self.completed[request.headers["X-Request-Id"]] += 1
            return web.json_response({"body": body.decode()})

        async def ping(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application(middlewares=[middleware(AnswerCache(), self._replayed)])
        app.router.add_post("/v1/completions", complete)
        app.router.add_get("/ping", ping)
        return app


@asynccontextmanager
async def counting_replicas(n: int) -> AsyncIterator[list[CountingReplica]]:
    replicas = [CountingReplica() for _ in range(n)]
    async with serve(replicas[0].app()) as first, serve(replicas[1].app()) as second:
        replicas[0].url, replicas[1].url = first, second
        yield replicas


@dataclass
class GatewayProcess:
    config: Path
    log: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {**os.environ, "INFERGATE_ADMIN_TOKEN": ADMIN}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "-c", str(self.config)],
                stdout=out, stderr=out, env=env,
            )  # fmt: skip
        await wait_http_ok(f"{self.url}/readyz", self.proc)


def _gateway(
    tmp_path: Path, name: str, store: str, replicas: list[CountingReplica]
) -> GatewayProcess:
    port = free_port()
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": port},
                "replicas": [{"url": r.url} for r in replicas],
                "jobs": {
                    "store": store,
                    "lease_s": 1.0,
                    "max_outstanding_per_replica": PER_REPLICA,
                },
            }
        )
    )
    return GatewayProcess(config, tmp_path / f"{name}.log", port)


async def _get(client: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    return await get_json(client, url, {"Authorization": f"Bearer {ADMIN}"})


async def test_kill_9_one_of_two_gateways_mid_batch_and_the_other_finishes_it(
    tmp_path: Path, postgres_url: str
) -> None:
    lines = [
        {"custom_id": f"c{i}", "url": "/v1/completions", "body": {"prompt": f"p{i}"}}
        for i in range(LINES)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    async with counting_replicas(2) as replicas, aiohttp.ClientSession() as client:
        first = _gateway(tmp_path, "first", postgres_url, replicas)
        second = _gateway(tmp_path, "second", postgres_url, replicas)
        try:
            await asyncio.gather(first.start(), second.start())
            async with client.post(f"{first.url}/v1/batches", data=data) as response:
                assert response.status == 202, await response.text()
                path = response.headers["Location"]
            while lines_done(await _get(client, second.url + path)) < LINES // 4:
                await asyncio.sleep(0.02)
            holder = _holder(first.log)
            for _ in range(500):  # a moment when the first is running jobs (it shares slots)
                if await _running(postgres_url, holder):
                    break
                await asyncio.sleep(0.005)
            assert first.proc is not None
            first.proc.kill()  # SIGKILL: no clean-up of any kind
            await asyncio.to_thread(first.proc.wait)
            orphans = await _running(postgres_url, holder)
            done_at_kill = lines_done(await _get(client, second.url + path))
            for _ in range(1500):
                batch = await _get(client, second.url + path)
                if batch["status"] == "completed":
                    break
                await asyncio.sleep(0.02)
            await first.start()  # a fresh gateway on the same store reads the same batch
            views = [await _get(client, g.url + path) for g in (first, second)]
            async with client.get(f"{first.url}{path}/results") as response:
                results = [json.loads(line) for line in (await response.text()).splitlines()]
            outstanding = [
                r["outstanding"]
                for g in (first, second)
                for r in (await _get(client, f"{g.url}/admin/replicas"))["replicas"]
            ]
        finally:
            codes = [stop(g.proc) for g in (first, second) if g.proc is not None]
        attempts = await _attempts(postgres_url)
    logs = first.log.read_text() + second.log.read_text()
    assert batch["status"] == "completed", logs[-3000:]
    assert done_at_kill < LINES, "the batch finished before the kill: nothing was tested"
    assert "leases ran out on" in second.log.read_text()  # the second took over the first's

    # Every line has exactly one result, the answer to its own request.
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
    for result in results:
        assert result["error"] is None and result["response"]["status_code"] == 200
        sent = json.loads(result["response"]["body"]["body"])
        assert sent == {"prompt": "p" + result["custom_id"][1:]}

    # Sent again: exactly the jobs the first held when it was killed. Counted at the
    # replicas: every job ran to completion once; a re-run of one that had finished was
    # answered from the cache.
    rerun = {job for job, n in attempts.items() if n > 1}
    assert orphans and rerun == orphans
    completed = sum((r.completed for r in replicas), collections.Counter[str]())
    assert set(completed) == set(attempts) and set(completed.values()) == {1}

    expected = {"total": LINES, "completed": LINES, "failed": 0, "queued": 0, "running": 0}
    assert [v["request_counts"] for v in views] == [expected, expected]
    assert outstanding == [0, 0, 0, 0]
    assert codes == [0, 0]


def _holder(log: Path) -> str:
    """The id a gateway claims jobs under, from its start-up log line."""
    (line,) = [x for x in log.read_text().splitlines() if "this gateway claims as " in x]
    return line.rsplit(" ", 1)[1]


async def _running(url: str, holder: str) -> set[str]:
    """The jobs `holder` had claimed and not finished."""
    db = await asyncpg.connect(url)
    try:
        rows = await db.fetch(
            "SELECT id FROM jobs WHERE holder = $1 AND status = 'running'", holder
        )
    finally:
        await db.close()
    return {row["id"] for row in rows}


async def _attempts(url: str) -> dict[str, int]:
    """Each job's attempts as the store counts them."""
    db = await asyncpg.connect(url)
    try:
        rows = await db.fetch("SELECT id, attempt FROM jobs")
    finally:
        await db.close()
    return {row["id"]: row["attempt"] for row in rows}
