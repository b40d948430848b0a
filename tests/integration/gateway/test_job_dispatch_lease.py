"""Job dispatches hold an admission lease (issue 13, A.3): a cancel at any moment, or a failure
the scheduler did not foresee, neither leaks an outstanding count nor leaves a job running.
A real gateway with its real store and scheduler, in front of a real fake-replica server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from gateway.jobs.requests import parse_job
from gateway.jobs.scheduler import Scheduler
from gateway.jobs.service import JOBS
from tests.support.servers import fake_replicas, gateway_config, running_gateway, write_config

COMPLETION = {"url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 4}}


def _config(tmp_path: Path, urls: list[str], **jobs: object) -> Path:
    path = tmp_path / "g.yaml"
    config = {
        "replicas": [{"url": url} for url in urls],
        "jobs": {"store": str(tmp_path / "jobs.db"), "poll_interval_s": 0.01, **jobs},
        "reload": {"poll_interval_s": 0.1},
    }
    write_config(path, config)
    return path


async def test_a_job_cancelled_before_its_dispatch_runs_leaks_no_count(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        path = tmp_path / "g.yaml"
        jobs = {"store": str(tmp_path / "jobs.db"), "max_outstanding_per_replica": 1}
        write_config(path, gateway_config(replicas, "least_outstanding_requests", jobs=jobs))
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            # A real-time request fills the replica's job threshold: the scheduler claims
            # nothing, so this test claims and starts the job itself, then cancels it in the
            # same loop turn, as a DELETE landing before the dispatch task's first step does.
            held = asyncio.create_task(client.get(f"{gw.url}/hold"))
            replica = gw.state.pool.all()[0]
            for _ in range(200):
                if replica.outstanding == 1:
                    break
                await asyncio.sleep(0.01)
            service = gw.app[JOBS]
            await service.store.add_job(parse_job(COMPLETION))
            job = await service.store.claim()
            assert job is not None
            await service.store.cancel_job(job.id)
            scheduler = service.scheduler
            scheduler._start(job, gw.state.pool.available())
            assert replica.outstanding == 2
            scheduler.abandon([job.id])
            await asyncio.sleep(0.05)
            assert replica.outstanding == 1, "the cancelled dispatch still holds its slot"
            replicas[0].release.set()
            (await held).release()


async def test_an_unforeseen_dispatch_failure_ends_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Scheduler, *args: object) -> object:
        raise RuntimeError("a bug in the dispatch path")

    # Fault injection at the one call that talks to the replica: what ends the job is ours.
    monkeypatch.setattr(Scheduler, "_send", broken)
    async with fake_replicas(1) as replicas:
        path = _config(tmp_path, [replicas[0].url], max_attempts=2)
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            async with client.post(f"{gw.url}/v1/jobs", json=COMPLETION) as response:
                job = await response.json()
            for _ in range(300):
                async with client.get(f"{gw.url}/v1/jobs/{job['id']}") as response:
                    seen = await response.json()
                if seen["status"] not in ("queued", "running"):
                    break
                await asyncio.sleep(0.02)
        assert seen["status"] == "failed", seen
        assert seen["attempts"] == 2
        assert "RuntimeError" in seen["error"]["message"]
