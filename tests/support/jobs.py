"""Deferred jobs and batches through a real gateway: a gateway with a job store and a client
beside it, a job's request, and a wait (bounded) for a job or batch to reach a status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.servers import (
    FakeReplica,
    Gateway,
    gateway_config,
    get_json,
    running_gateway,
    write_config,
)

COMPLETION = {"url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 4}}
ENDED = ("succeeded", "failed", "completed", "cancelled")  # a job's or batch's last statuses


@asynccontextmanager
async def jobs_gateway(
    tmp_path: Path,
    store: str,
    replicas: list[FakeReplica],
    strategy: str = "least_outstanding_requests",
    **extra: Any,
) -> AsyncIterator[tuple[Gateway, aiohttp.ClientSession]]:
    """A gateway whose jobs.store is `store`, polled every 10 ms (`extra["jobs"]` adds to its
    jobs section, the rest of `extra` to its config), and a client session."""
    jobs = {"store": store, "poll_interval_s": 0.01, **extra.pop("jobs", {})}
    config = gateway_config(replicas, strategy, jobs=jobs, **extra)
    write_config(tmp_path / "g.yaml", config)
    async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
        yield gw, client


async def until_status(client: aiohttp.ClientSession, url: str, *statuses: str) -> dict[str, Any]:
    """The job or batch at `url` once its status is one of `statuses` (about 10 s at the most)."""
    for _ in range(500):
        body = await get_json(client, url)
        if body["status"] in statuses:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url} stayed {body['status']}")
