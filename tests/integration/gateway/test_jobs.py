"""Deferred jobs and batches as a client sees them, through a real gateway and fake replicas,
on each job store: an SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.jobs import COMPLETION, jobs_gateway, until_status
from tests.support.processes import BIN
from tests.support.servers import (
    FakeReplica,
    fake_replicas,
    gateway_config,
    get_json,
    running_gateway,
    wait_until,
    write_config,
)


async def _error(response: aiohttp.ClientResponse) -> tuple[int, str, str]:
    error = (await response.json())["error"]
    return response.status, error["type"], error["message"]


async def test_a_job_runs_on_a_replica_and_its_result_is_kept(tmp_path: Path, store: str) -> None:
    async with (
        fake_replicas(1) as replicas,
        jobs_gateway(tmp_path, store, replicas) as (gw, client),
    ):
        async with client.post(f"{gw.url}/v1/jobs", json=COMPLETION) as response:
            assert response.status == 202
            job = await response.json()
            location = response.headers["Location"]
        assert location == f"/v1/jobs/{job['id']}" and job["status"] in ("queued", "running")
        done = await until_status(client, gw.url + location, "succeeded")
        async with client.get(f"{gw.url}/metrics") as response:
            metrics = await response.text()
    assert 'gateway_jobs_finished_total{status="succeeded"} 1.0' in metrics
    (seen,) = replicas[0].seen
    assert (seen["method"], seen["path"]) == ("POST", "/v1/completions")
    assert json.loads(seen["body"]) == COMPLETION["body"]
    assert {k.lower(): v for k, v in seen["headers"].items()}["x-request-id"] == job["id"]
    assert done["response"]["status_code"] == 200
    assert done["response"]["body"]["replica"] == "r0"
    assert done["error"] is None and done["attempts"] == 1 and done["expires_at"] is not None


async def test_jobs_wait_while_the_replica_is_busy_and_real_time_goes_first(
    tmp_path: Path, store: str
) -> None:
    limits = {"max_outstanding_per_replica": 1, "max_queue": 4, "queue_timeout_s": 10}
    async with (
        fake_replicas(1) as (replica,),
        jobs_gateway(tmp_path, store, [replica], limits=limits) as (gw, client),
    ):
        first = asyncio.create_task(client.post(f"{gw.url}/hold"))
        await wait_until(lambda: replica.in_flight == 1)
        second = asyncio.create_task(client.post(f"{gw.url}/sleep?s=0.3"))
        await wait_until(lambda: gw.state.admission.queued == 1)  # real time waits its turn
        async with client.post(f"{gw.url}/v1/jobs", json=COMPLETION) as response:
            job = await response.json()
        await asyncio.sleep(0.2)
        assert (await get_json(client, f"{gw.url}/v1/jobs/{job['id']}"))["status"] == "queued"
        replica.release.set()
        await wait_until(lambda: gw.state.admission.queued == 0 and replica.in_flight == 1)
        await asyncio.sleep(0.1)
        assert not replica.seen, "the job took the slot a queued real-time request waited for"
        for task in (first, second):
            (await task).release()
        await until_status(client, f"{gw.url}/v1/jobs/{job['id']}", "succeeded")
    assert [seen["path"] for seen in replica.seen] == ["/v1/completions"]


async def test_cancel_a_running_job_frees_the_replica_and_a_finished_one_is_409(
    tmp_path: Path, store: str
) -> None:
    async with (
        fake_replicas(1) as (replica,),
        jobs_gateway(tmp_path, store, [replica]) as (gw, client),
    ):
        async with client.post(f"{gw.url}/v1/jobs", json={"url": "/hold", "body": {}}) as r:
            job_url = f"{gw.url}{r.headers['Location']}"
        await until_status(client, job_url, "running")
        await wait_until(lambda: replica.in_flight == 1)
        async with client.delete(job_url) as response:
            assert response.status == 200
            assert (await response.json())["status"] == "cancelled"
        await wait_until(lambda: gw.state.pool.outstanding == 0)
        async with client.delete(job_url) as response:
            status, kind, message = await _error(response)
        assert (status, kind) == (409, "conflict") and "already cancelled" in message
        done = await get_json(client, job_url)
        assert done["error"]["code"] == "cancelled"
        for method in ("GET", "DELETE"):
            async with client.request(method, f"{gw.url}/v1/jobs/job_nope") as response:
                assert (await _error(response))[:2] == (404, "not_found")


async def test_listing_jobs_by_status(tmp_path: Path, store: str) -> None:
    async with (
        fake_replicas(1) as replicas,
        jobs_gateway(tmp_path, store, replicas) as (gw, client),
    ):
        ids = []
        for _ in range(3):
            async with client.post(f"{gw.url}/v1/jobs", json=COMPLETION) as response:
                ids.append((await response.json())["id"])
        for job_id in ids:
            await until_status(client, f"{gw.url}/v1/jobs/{job_id}", "succeeded")
        page = await get_json(client, f"{gw.url}/v1/jobs?status=succeeded&limit=2")
        assert [j["id"] for j in page["data"]] == ids[:2] and page["has_more"]
        page = await get_json(client, f"{gw.url}/v1/jobs?status=queued")
        assert page == {"object": "list", "data": [], "has_more": False}
        async with client.get(f"{gw.url}/v1/jobs?status=done") as response:
            status, _, message = await _error(response)
        assert status == 400 and "status: expected one of queued, running" in message
        async with client.get(f"{gw.url}/v1/jobs?limit=0") as response:
            assert (await _error(response))[0] == 400


async def test_a_batch_runs_every_line_and_bad_lines_fail_with_a_reason(
    tmp_path: Path, store: str
) -> None:
    lines = [json.dumps({"custom_id": f"c{i}", **COMPLETION}) for i in range(20)]
    lines.insert(5, '{"custom_id": "broken", "url": "/v1/completions"')
    lines.insert(9, json.dumps({"custom_id": "up", "url": "/v1/completions", "body": []}))
    data = "\n".join(lines).encode()
    async with (
        fake_replicas(2) as replicas,
        jobs_gateway(tmp_path, store, replicas) as (gw, client),
    ):
        async with client.post(f"{gw.url}/v1/batches", data=data) as response:
            assert response.status == 202
            batch = await response.json()
            location = response.headers["Location"]
        assert batch["request_counts"]["total"] == 22
        done = await until_status(client, gw.url + location, "completed")
        async with client.get(f"{gw.url}{done['results_url']}") as response:
            assert response.headers["Content-Type"] == "application/jsonl"
            results = [json.loads(line) for line in (await response.text()).splitlines()]
        listed = await get_json(client, f"{gw.url}/v1/batches")
    assert [b["id"] for b in listed["data"]] == [batch["id"]]
    counts = done["request_counts"]
    assert (counts["total"], counts["completed"], counts["failed"]) == (22, 20, 2)
    assert [r["custom_id"] for r in results[:6]] == ["c0", "c1", "c2", "c3", "c4", None]
    assert results[5]["error"]["message"].startswith("line 6: not valid JSON")
    assert results[9]["error"]["message"].startswith("line 10: body: ")
    ok = [r for r in results if r["error"] is None]
    assert len(ok) == 20 and all(r["response"]["status_code"] == 200 for r in ok)
    assert sum(len(r.seen) for r in replicas) == 20


async def test_results_of_a_batch_in_progress_are_409_and_cancel_stops_it(
    tmp_path: Path, store: str
) -> None:
    data = "\n".join(
        json.dumps({"custom_id": str(i), "url": "/hold", "body": {}}) for i in range(5)
    ).encode()
    async with (
        fake_replicas(1) as (replica,),
        jobs_gateway(tmp_path, store, [replica]) as (gw, client),
    ):
        async with client.post(f"{gw.url}/v1/batches", data=data) as response:
            batch_url = gw.url + response.headers["Location"]
        await wait_until(lambda: replica.in_flight == 1)
        async with client.get(f"{batch_url}/results") as response:
            status, _, message = await _error(response)
        assert status == 409 and "in_progress (0 of 5 lines done)" in message
        async with client.post(f"{batch_url}/cancel") as response:
            assert response.status == 200
            cancelled = await response.json()
        assert cancelled["status"] == "cancelled"
        assert cancelled["request_counts"]["failed"] == 5
        await wait_until(lambda: gw.state.pool.outstanding == 0)
        async with client.post(f"{batch_url}/cancel") as response:
            assert (await _error(response))[0] == 409
        async with client.get(f"{batch_url}/results") as response:
            results = [json.loads(line) for line in (await response.text()).splitlines()]
    assert [r["error"]["code"] for r in results] == ["cancelled"] * 5


async def test_bad_requests_get_a_4xx_that_says_what_to_fix(tmp_path: Path, store: str) -> None:
    line = json.dumps({"custom_id": "x", **COMPLETION}) + "\n"
    jobs = {"max_batch_bytes": 1000, "max_batch_lines": 3}
    async with (
        fake_replicas(1) as replicas,
        jobs_gateway(tmp_path, store, replicas, jobs=jobs) as (gw, client),
    ):
        cases: list[tuple[str, dict[str, Any], int, str]] = [
            ("/v1/batches", {"data": line * 20}, 413, "jobs.max_batch_bytes = 1000"),
            ("/v1/batches", {"data": line * 4}, 400, "4 lines, over jobs.max_batch_lines = 3"),
            ("/v1/batches", {"data": "\n"}, 400, "no requests"),
            ("/v1/batches", {"data": aiohttp.FormData({"file": line})}, 400, "--data-binary"),
            ("/v1/batches", {"data": _multipart(line)}, 400, "--data-binary"),
            ("/v1/jobs", {"data": "{nope"}, 400, "not valid JSON"),
            ("/v1/jobs", {"json": {"url": "/v1/x"}}, 400, "body: required key is missing"),
            ("/v1/jobs", {"json": {**COMPLETION, "url": "/admin/x"}}, 400, "gateway's own"),
        ]
        seen = []
        for path, kwargs, *_ in cases:
            async with client.post(f"{gw.url}{path}", **kwargs) as response:
                status, kind, message = await _error(response)
                assert kind == ("body_too_large" if status == 413 else "invalid_request")
                seen.append((status, message))
        async with client.put(f"{gw.url}/v1/jobs") as response:
            assert response.status == 405
        async with client.get(f"{gw.url}/v1/batches/batch_nope") as response:
            assert (await _error(response))[:2] == (404, "not_found")
    for (status, message), (path, _, expected_status, expected) in zip(seen, cases, strict=True):
        assert status == expected_status and expected in message, (path, status, message)
    assert not replicas[0].seen


def _multipart(text: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", text, filename="batch.jsonl")
    return form


async def test_jobs_are_off_without_a_jobs_section(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "random"))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            async with client.post(f"{gw.url}/v1/jobs", json=COMPLETION) as response:
                status, _, message = await _error(response)
    assert status == 404 and "add a 'jobs:' section" in message
    assert not replicas[0].seen


async def test_a_job_whose_replica_keeps_failing_fails_after_max_attempts(
    tmp_path: Path, store: str
) -> None:
    async with fake_replicas(1) as replicas:
        dead = FakeReplica("dead", url=replicas[0].url)
    async with jobs_gateway(
        tmp_path, store, [dead], jobs={"max_attempts": 2}, outlier_detection=None
    ) as (
        gw,
        client,
    ):
        async with client.post(f"{gw.url}/v1/jobs", json=COMPLETION) as response:
            job_url = gw.url + response.headers["Location"]
        done = await until_status(client, job_url, "failed")
        async with client.get(f"{gw.url}/metrics") as response:
            metrics = await response.text()
    assert "gateway_job_retries_total 1.0" in metrics
    assert done["attempts"] == 2 and done["response"] is None
    assert done["error"]["code"] == "upstream_error"
    assert "refused" in done["error"]["message"] or "failed" in done["error"]["message"]


async def test_cli_submits_waits_and_downloads_results(tmp_path: Path, store: str) -> None:
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        "\n".join(json.dumps({"custom_id": f"c{i}", **COMPLETION}) for i in range(30)) + "\n"
    )
    async with fake_replicas(2) as replicas, jobs_gateway(tmp_path, store, replicas) as (gw, _):

        async def cli(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                str(BIN / "infergate"), "jobs", *args, "--url", gw.url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        code, out, err = await cli("submit", str(batch), "--wait", "--poll-interval-s", "0.05")
        batch_id = out.strip()
        assert code == 0, err
        assert err.strip().splitlines()[-1].startswith(f"[{'#' * 30}] 30/30 done, 0 failed")
        code, out, _ = await cli("status", batch_id)
        assert code == 0 and json.loads(out)["status"] == "completed"
        code, _, _ = await cli("results", batch_id, "-o", str(tmp_path / "out.jsonl"))
        results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert code == 0 and [r["custom_id"] for r in results] == [f"c{i}" for i in range(30)]
        code, _, err = await cli("status", "job_nope")
        assert code == 2 and "404: no job 'job_nope'" in err


async def test_a_nul_character_is_refused_with_a_4xx_on_either_store(
    tmp_path: Path, store: str
) -> None:
    lines = [{"custom_id": "a\x00", **COMPLETION}, {"custom_id": "b", **COMPLETION}]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    async with (
        fake_replicas(1) as replicas,
        jobs_gateway(tmp_path, store, replicas) as (gw, client),
    ):
        job = {**COMPLETION, "custom_id": "a\x00"}
        async with client.post(f"{gw.url}/v1/jobs", json=job) as response:
            refused = await _error(response)
        async with client.post(f"{gw.url}/v1/batches", data=data) as response:
            assert response.status == 202  # the bad line fails alone
            location = response.headers["Location"]
        done = await until_status(client, gw.url + location, "completed")
        async with client.get(f"{gw.url}{done['results_url']}") as response:
            results = [json.loads(line) for line in (await response.text()).splitlines()]
        async with client.get(f"{gw.url}/v1/jobs/job_%00") as response:
            lookup = await _error(response)
    assert refused[:2] == (400, "invalid_request") and "NUL" in refused[2]
    assert "NUL character" in results[0]["error"]["message"] and results[1]["error"] is None
    # Never in any store: SQLite finds no such job, PostgreSQL cannot hold the character.
    assert lookup[0] == (400 if store.startswith("postgresql") else 404)


async def test_under_flow_control_jobs_wait_in_the_queue_below_every_class_and_are_never_shed(
    tmp_path: Path, store: str
) -> None:
    flow = {
        "classes": [{"name": "interactive"}, {"name": "batch", "sheddable": True}],
        "default_class": "batch",
        "max_queued": 1,
    }
    limits = {"max_outstanding_per_replica": 1}
    async with (
        fake_replicas(1) as (replica,),
        jobs_gateway(
            tmp_path,
            store,
            [replica],
            limits=limits,
            flow_control=flow,
            jobs={"max_outstanding_per_replica": 2},
        ) as (gw, client),
    ):
        first = asyncio.create_task(client.post(f"{gw.url}/hold"))
        await wait_until(lambda: replica.in_flight == 1)
        jobs = []
        for _ in range(2):
            async with client.post(f"{gw.url}/v1/jobs", json=COMPLETION) as response:
                jobs.append((await response.json())["id"])
        await wait_until(lambda: gw.state.admission.waiting() == {(2, "jobs"): 2})
        second = asyncio.create_task(client.post(f"{gw.url}/echo"))  # batch, real time
        await wait_until(lambda: gw.state.admission.queued == 3)
        # The queue's bound counts real-time requests only: a third is refused, the jobs stay.
        async with client.post(f"{gw.url}/echo") as refused:
            assert refused.status == 429
            assert refused.headers["X-Infergate-Dropped-Reason"] == "queue-full"
        assert gw.state.admission.waiting()[(2, "jobs")] == 2
        replica.release.set()
        for task in (first, second):
            (await task).release()
        for job in jobs:
            await until_status(client, f"{gw.url}/v1/jobs/{job}", "succeeded")
    # The real-time request that queued after the jobs went before them.
    assert [seen["path"] for seen in replica.seen] == [
        "/echo",
        "/v1/completions",
        "/v1/completions",
    ]
