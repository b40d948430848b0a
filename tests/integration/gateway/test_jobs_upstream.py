"""Jobs held to the data path's rules (issue 30, B.9 and B.10): a job or batch line whose url
holds a dot segment is refused when it is submitted (it was sent, refused by the upstream
client, logged as 'dispatch failed' and tried again), and a replica's status outside 200-599
is an upstream failure of the attempt (aiohttp's client takes any three digits), never a
job's result code. A real gateway; a raw TCP stand-in replica where it must misbehave."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.support.jobs import COMPLETION, ENDED, jobs_gateway, until_status
from tests.support.raw_upstream import config_for, fixed, raw_upstream
from tests.support.servers import (
    fake_replicas,
    running_gateway,
    wait_until,
    write_config,
)

DOTTED = ("/v1/../admin/replicas", "/v1/%2e%2E/x", "/./v1/completions", "/v1\\..\\x")


async def test_a_dot_segment_in_a_job_url_is_refused_at_submit(tmp_path: Path) -> None:
    lines = [json.dumps({"custom_id": "ok", **COMPLETION})]
    lines += [
        json.dumps({"custom_id": f"d{i}", "url": url, "body": {}}) for i, url in enumerate(DOTTED)
    ]
    store = str(tmp_path / "jobs.db")
    async with fake_replicas(1) as (replica,):
        async with jobs_gateway(tmp_path, store, [replica], "random") as (gw, client):
            for url in DOTTED:
                async with client.post(
                    f"{gw.url}/v1/jobs", json={**COMPLETION, "url": url}
                ) as response:
                    assert response.status == 400, (url, await response.text())
                    error = (await response.json())["error"]
                assert error["type"] == "invalid_request", url
                assert error["message"].startswith("url: the path holds a '.' or '..' segment"), url
            async with client.post(f"{gw.url}/v1/batches", data="\n".join(lines)) as response:
                assert response.status == 202, await response.text()
                location = response.headers["Location"]
            batch = await until_status(client, gw.url + location, *ENDED)
            async with client.get(gw.url + batch["results_url"]) as response:
                results = [json.loads(line) for line in (await response.text()).splitlines()]
            await wait_until(lambda: gw.state.pool.outstanding == 0)
    counts = batch["request_counts"]
    assert (counts["completed"], counts["failed"]) == (1, len(DOTTED))
    assert results[0]["response"]["status_code"] == 200
    for result in results[1:]:
        assert "'.' or '..' segment" in result["error"]["message"], result
    assert [seen["path"] for seen in replica.seen] == ["/v1/completions"]


@pytest.mark.parametrize("code", ["600", "999", "000", "099"])
async def test_a_status_outside_200_599_fails_the_attempt_not_the_job_result(
    tmp_path: Path, code: str
) -> None:
    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        if b"/v1/completions" not in head:  # the gateway's pollers
            writer.write(fixed(b"{}"))
            return True
        body = b'{"choices": []}'
        writer.write(
            b"HTTP/1.1 %s Odd\r\nContent-Length: %d\r\n\r\n%s" % (code.encode(), len(body), body)
        )
        return True

    jobs = {"store": str(tmp_path / "jobs.db"), "poll_interval_s": 0.01, "max_attempts": 2}
    async with raw_upstream(answer) as upstream:
        write_config(tmp_path / "g.yaml", config_for(upstream.url, jobs=jobs))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            async with client.post(f"{gw.url}/v1/jobs", json=COMPLETION) as response:
                assert response.status == 202, await response.text()
                location = response.headers["Location"]
            job = await until_status(client, gw.url + location, *ENDED)
            await wait_until(lambda: gw.state.pool.outstanding == 0)
    assert job["status"] == "failed" and job["attempts"] == 2, job
    assert job["response"] is None, job  # no result code 600 (or 000) stored
    assert job["error"]["code"] == "upstream_error", job
    assert f"invalid status {code}" in job["error"]["message"], job
    assert len(upstream.connections(b"/v1/completions")) >= 1
