"""Jobs and batches against hostile input, through a real gateway, on each job store: bodies
nested past the limit, lone surrogates, integers of 5,000 digits and non-ASCII digits are 400s
(a bad batch line fails alone); a replica's deeply nested answer is kept as text and never
breaks a read; a key over its storage quota gets a 429 saying what is left, and cancelling a
batch gives its share back at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.jobs.requests import MAX_BODY_DEPTH
from tests.support.jobs import jobs_gateway, until_status
from tests.support.servers import (
    FakeReplica,
    fake_replicas,
    get_json,
    serve,
    wait_until,
)

DEEP_ANSWER = "[" * 5000 + "]" * 5000


async def _post(client: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    async with client.post(url, data=data) as response:
        return response.status, await response.json()


def _job(custom_id: str = "c", body: str = '{"prompt": "hi", "max_tokens": 4}') -> bytes:
    return f'{{"custom_id": "{custom_id}", "url": "/v1/completions", "body": {body}}}'.encode()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_JOBS: list[tuple[str, bytes, str]] = [
    ("5000 deep", _job(body='{"x": ' + _nested(5000) + "}"), "deeper than"),
    ("a body one past the limit", _job(body='{"x": ' + _nested(MAX_BODY_DEPTH) + "}"),
     "deeper than"),
    ("unterminated", b"{" * 5000, "deeper than"),
    ("a lone surrogate custom_id", _job(custom_id="\\ud800"), "custom_id: must be valid Unicode"),
    ("5000 digits", _job(body='{"seed": ' + "9" * 5000 + "}"), "not valid JSON"),
]  # fmt: skip


async def test_hostile_job_bodies_are_a_400_and_a_bad_line_fails_alone(
    tmp_path: Path, store: str
) -> None:
    at_limit = _job("deepest", '{"x": ' + _nested(MAX_BODY_DEPTH - 1) + "}")
    async with (
        fake_replicas(1) as replicas,
        jobs_gateway(tmp_path, store, replicas, "round_robin") as (gw, client),
    ):
        for what, data, needle in BAD_JOBS:
            status, answer = await _post(client, f"{gw.url}/v1/jobs", data)
            assert status == 400 and needle in answer["error"]["message"], (what, answer)
        for query in ("limit=\u00b2", "limit=\u0661", "limit=" + "9" * 5000):
            for path in ("/v1/jobs", "/v1/batches"):
                async with client.get(f"{gw.url}{path}?{query}") as response:
                    answer = await response.json()
                assert response.status == 400 and "limit: expected" in answer["error"]["message"]
        status, job = await _post(client, f"{gw.url}/v1/jobs", at_limit)
        assert status == 202
        lines = [_job("first"), *(data for _, data, _ in BAD_JOBS), at_limit, _job("last")]
        status, batch = await _post(client, f"{gw.url}/v1/batches", b"\n".join(lines))
        assert status == 202, batch
        done = await until_status(client, f"{gw.url}/v1/batches/{batch['id']}", "completed")
        async with client.get(f"{gw.url}{done['results_url']}") as response:
            results = [json.loads(line) for line in (await response.text()).splitlines()]
        assert (await until_status(client, f"{gw.url}/v1/jobs/{job['id']}", "succeeded"))[
            "error"
        ] is None
    assert [r["error"] is None for r in results] == [True] + [False] * len(BAD_JOBS) + [True] * 2
    for result, (what, _, needle) in zip(results[1:], BAD_JOBS, strict=False):
        assert needle in result["error"]["message"], (what, result)


def _deep_replica() -> web.Application:
    """A replica that answers every job with JSON nested 5,000 deep."""

    async def deep(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=DEEP_ANSWER, content_type="application/json")

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def no_models(request: web.Request) -> web.Response:
        return web.json_response({"error": "no model list here"}, status=404)

    app = web.Application()
    app.router.add_get("/ping", ping)
    app.router.add_get("/v1/models", no_models)
    app.router.add_post("/{tail:.*}", deep)
    app.router.add_get("/{tail:.*}", no_models)
    return app


async def test_a_deeply_nested_answer_is_kept_as_text_and_every_read_works(
    tmp_path: Path, store: str
) -> None:
    async with serve(_deep_replica()) as url:
        replica = FakeReplica("deep", url=url)
        async with jobs_gateway(tmp_path, store, [replica], "round_robin") as (gw, client):
            status, job = await _post(client, f"{gw.url}/v1/jobs", _job())
            assert status == 202
            done = await until_status(client, f"{gw.url}/v1/jobs/{job['id']}", "succeeded")
            status, batch = await _post(client, f"{gw.url}/v1/batches", _job())
            finished = await until_status(client, f"{gw.url}/v1/batches/{batch['id']}", "completed")
            listing = await get_json(client, f"{gw.url}/v1/jobs")
            async with client.get(f"{gw.url}{finished['results_url']}") as response:
                assert response.status == 200
                (result,) = [json.loads(line) for line in (await response.text()).splitlines()]
    assert done["response"] == {"status_code": 200, "body": DEEP_ANSWER}
    assert [j["response"]["body"] for j in listing["data"]] == [DEEP_ANSWER] * 2
    assert result["response"]["body"] == DEEP_ANSWER


async def test_a_key_over_its_storage_quota_gets_a_429_and_a_cancel_frees_its_share(
    tmp_path: Path, store: str
) -> None:
    quota = {"max_bytes_per_key": 3000, "max_lines_per_key": 8}
    hold = b'{"custom_id": "%d", "url": "/hold", "body": {"pad": "' + b"x" * 250 + b'"}}'
    batch_of = [hold % i for i in range(6)]  # 6 bodies of 261 bytes: most of 3000
    async with (
        fake_replicas(1) as (replica,),
        jobs_gateway(tmp_path, store, [replica], "round_robin", jobs=quota) as (gw, client),
    ):
        status, first = await _post(client, f"{gw.url}/v1/batches", b"\n".join(batch_of))
        assert status == 202, first
        await wait_until(lambda: replica.in_flight == 1)
        status, refused = await _post(client, f"{gw.url}/v1/batches", b"\n".join(batch_of))
        small = await _post(client, f"{gw.url}/v1/jobs", _job())
        too_many = await _post(client, f"{gw.url}/v1/batches", b"\n".join([_job()] * 3))
        async with client.post(f"{gw.url}/v1/batches/{first['id']}/cancel") as response:
            assert response.status == 200
        await wait_until(lambda: gw.state.pool.outstanding == 0)
        again = await _post(client, f"{gw.url}/v1/batches", b"\n".join(batch_of))
        assert again[0] == 202, again
        async with client.post(f"{gw.url}/v1/batches/{again[1]['id']}/cancel") as response:
            assert response.status == 200
        await wait_until(lambda: gw.state.pool.outstanding == 0)
    message = refused["error"]["message"]
    assert status == 429 and refused["error"]["type"] == "quota_exceeded", refused
    assert "1560 of 3000 bytes and 6 of 8 lines are in use, 1440 bytes and 2 lines left" in message
    assert small[0] == 202  # what is left still takes a small job
    assert too_many[0] == 429 and "1410 bytes and 1 lines left" in too_many[1]["error"]["message"]
