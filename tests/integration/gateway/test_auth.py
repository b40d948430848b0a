"""API keys (config `auth.api_keys`) through a real gateway: a proxied or jobs request without a
valid key is a 401 in OpenAI's error shape; a good key (by digest or plain) passes and is
forwarded as sent; the gateway's own endpoints keep their rules; keys follow a hot reload; and
jobs and batches belong to the key that made them."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.jobs import client as jobs_client
from tests.support.raw_http import exchange
from tests.support.servers import (
    FakeReplica,
    Gateway,
    fake_replicas,
    gateway_config,
    running_gateway,
    wait_until,
    write_config,
)

KEY_A = "sk-team-a-0123456789abcdef"  # configured by its digest
KEY_B = "sk-team-b-fedcba9876543210"  # configured plain ({name, key}: local use)
COMPLETION = {"url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 4}}


def _auth(*extra: dict[str, str]) -> dict[str, Any]:
    digest = hashlib.sha256(KEY_A.encode()).hexdigest()
    keys = [{"name": "team-a", "sha256": digest}, {"name": "team-b", "key": KEY_B}, *extra]
    return {"api_keys": keys}


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def keyed_gateway(
    tmp_path: Path, replicas: list[FakeReplica], store: str | None = None
) -> AsyncIterator[tuple[Gateway, aiohttp.ClientSession]]:
    jobs = {"store": store or str(tmp_path / "jobs.db"), "poll_interval_s": 0.01}
    write_config(tmp_path / "g.yaml", gateway_config(replicas, "random", auth=_auth(), jobs=jobs))
    async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
        yield gw, client


async def _call(
    client: aiohttp.ClientSession, method: str, url: str, key: str | None = None, **kw: Any
) -> tuple[int, Any]:
    headers = _as(key) if key is not None else {}
    async with client.request(method, url, headers=headers, **kw) as response:
        body = await response.json(content_type=None) if await response.read() else None
        return response.status, body


async def test_a_request_without_a_valid_key_is_a_401_in_openai_shape(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,), keyed_gateway(tmp_path, [replica]) as (gw, client):
        answers = []
        for headers in (
            {},
            _as("sk-wrong"),
            {"Authorization": KEY_A},
            {"Authorization": "Basic x"},
        ):
            for path in ("/v1/completions", "/v1/jobs"):
                async with client.post(gw.url + path, json={}, headers=headers) as response:
                    challenge = response.headers.get("WWW-Authenticate")
                    answers.append((response.status, challenge, await response.json()))
    assert {(status, challenge) for status, challenge, _ in answers} == {(401, "Bearer")}
    errors = [body["error"] for _, _, body in answers]
    assert all(set(body) == {"error"} for _, _, body in answers)
    assert {(e["type"], *sorted(e)) for e in errors} == {("unauthorized", "message", "type")}
    assert "Authorization: Bearer" in errors[0]["message"]
    assert all("sk-wrong" not in e["message"] for e in errors)  # the key is never echoed
    assert not replica.seen  # nothing reached the replica


async def test_a_good_key_passes_by_digest_or_plain_and_is_forwarded(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,), keyed_gateway(tmp_path, [replica]) as (gw, client):
        for key in (KEY_A, KEY_B):
            status, body = await _call(client, "POST", f"{gw.url}/v1/completions", key, json={})
            assert status == 200 and body["replica"] == "r0"
        own = [await _call(client, "GET", gw.url + path) for path in ("/healthz", "/readyz")]
        async with client.get(f"{gw.url}/metrics") as response:
            assert response.status == 200  # the gateway's own endpoints need no API key
            metrics = await response.text()
    assert [status for status, _ in own] == [200, 200]
    for name in ("team-a", "team-b"):  # the key's name labels the requests it made
        line = f'gateway_requests_total{{code="2xx",key="{name}",replica="{replica.url}"}} 1.0'
        assert line in metrics, metrics
    forwarded = [{k.lower(): v for k, v in seen["headers"].items()} for seen in replica.seen]
    assert [h["authorization"] for h in forwarded] == [f"Bearer {KEY_A}", f"Bearer {KEY_B}"]


async def test_keys_follow_a_hot_reload(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,), keyed_gateway(tmp_path, [replica]) as (gw, client):
        new_key = "sk-team-c-0000000000000000"
        assert (await _call(client, "GET", f"{gw.url}/x", new_key))[0] == 401
        config = gateway_config([replica], "random", auth=_auth({"name": "c", "key": new_key}))
        config["jobs"] = {"store": str(tmp_path / "jobs.db"), "poll_interval_s": 0.01}
        write_config(tmp_path / "g.yaml", config)
        await wait_until(lambda: len(_auth_keys(gw)) == 3)
        assert (await _call(client, "GET", f"{gw.url}/x", new_key))[0] == 200
        config.pop("auth")  # auth off again: anyone may use the gateway
        write_config(tmp_path / "g.yaml", config)
        await wait_until(lambda: gw.state.runtime.config.auth is None)
        assert (await _call(client, "GET", f"{gw.url}/x"))[0] == 200


def _auth_keys(gw: Gateway) -> list[str]:
    auth = gw.state.runtime.config.auth
    return [key.name for key in auth.api_keys] if auth else []


async def test_jobs_and_batches_belong_to_the_key_that_made_them(
    tmp_path: Path, store: str
) -> None:
    async with (
        fake_replicas(1) as (replica,),
        keyed_gateway(tmp_path, [replica], store) as (gw, client),
    ):
        base = gw.url
        line = b'{"custom_id": "one", "url": "/v1/completions", "body": {"prompt": "x"}}\n'
        _, batch = await _call(client, "POST", f"{base}/v1/batches", KEY_A, data=line)
        _, job = await _call(client, "POST", f"{base}/v1/jobs", KEY_A, json=COMPLETION)
        for _ in range(200):
            _, done = await _call(client, "GET", f"{base}/v1/jobs/{job['id']}", KEY_A)
            if done["status"] == "succeeded":  # the batch line went first
                break
            await asyncio.sleep(0.02)
        hold = {"url": "/hold", "body": {}}
        _, held = await _call(client, "POST", f"{base}/v1/jobs", KEY_A, json=hold)
        await wait_until(lambda: replica.in_flight == 1)  # the held job is running

        # Team b sees none of it: every read and every cancel is "not found".
        b_reads = [
            await _call(client, "GET", f"{base}/v1/jobs/{job['id']}", KEY_B),
            await _call(client, "DELETE", f"{base}/v1/jobs/{held['id']}", KEY_B),
            await _call(client, "GET", f"{base}/v1/batches/{batch['id']}", KEY_B),
            await _call(client, "GET", f"{base}/v1/batches/{batch['id']}/results", KEY_B),
            await _call(client, "POST", f"{base}/v1/batches/{batch['id']}/cancel", KEY_B),
        ]
        b_lists = [
            await _call(client, "GET", f"{base}/v1/jobs", KEY_B),
            await _call(client, "GET", f"{base}/v1/jobs?batch_id={batch['id']}", KEY_B),
            await _call(client, "GET", f"{base}/v1/batches", KEY_B),
        ]
        # Team a sees all of it, and its held job is still running after b's cancel.
        _, a_jobs = await _call(client, "GET", f"{base}/v1/jobs", KEY_A)
        _, a_batches = await _call(client, "GET", f"{base}/v1/batches", KEY_A)
        _, still = await _call(client, "GET", f"{base}/v1/jobs/{held['id']}", KEY_A)
        async with client.get(f"{base}/v1/batches/{batch['id']}/results", headers=_as(KEY_A)) as r:
            a_results = (r.status, await r.text())
        cancelled = await _call(client, "DELETE", f"{base}/v1/jobs/{held['id']}", KEY_A)
        no_key = await _call(client, "GET", f"{base}/v1/jobs/{job['id']}")
        await wait_until(lambda: gw.state.pool.outstanding == 0)
    assert [(status, body["error"]["type"]) for status, body in b_reads] == [(404, "not_found")] * 5
    assert [(status, body["data"]) for status, body in b_lists] == [(200, [])] * 3
    assert {j["id"] for j in a_jobs["data"]} >= {job["id"], held["id"]}
    assert [b["id"] for b in a_batches["data"]] == [batch["id"]]
    assert still["status"] == "running"
    assert a_results[0] == 200 and '"custom_id": "one"' in a_results[1]
    assert cancelled[0] == 200 and cancelled[1]["status"] == "cancelled"
    assert no_key[0] == 401


async def test_the_jobs_client_sends_its_api_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}\n')
    async with fake_replicas(1) as (replica,), keyed_gateway(tmp_path, [replica]) as (gw, _):
        submit = ["submit", str(batch), "--url", gw.url, "--wait", "--poll-interval-s", "0.02"]
        refused = await asyncio.to_thread(jobs_client.main, submit)
        refusal = capsys.readouterr().err
        done = await asyncio.to_thread(jobs_client.main, [*submit, "--api-key", KEY_B])
        await wait_until(lambda: gw.state.pool.outstanding == 0)
    assert refused == 2 and "401: this gateway needs an API key" in refusal
    assert done == 0


async def test_an_idempotency_key_reaches_the_replica_within_its_api_key(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,), keyed_gateway(tmp_path, [replica]) as (gw, client):
        for key in (KEY_A, KEY_B):
            headers = {**_as(key), "Idempotency-Key": "1"}
            async with client.post(f"{gw.url}/v1/completions", json={}, headers=headers) as r:
                assert r.status == 200
    seen = [{k.lower(): v for k, v in s["headers"].items()} for s in replica.seen]
    assert [s["idempotency-key"] for s in seen] == ["team-a/1", "team-b/1"]


async def test_a_key_of_any_bytes_is_a_401_and_compared_as_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Header bytes that are not UTF-8 are the client's key as sent: compared byte for byte (no
    # two spellings of one key), never a 5xx. "sk-?" is configured: a lossy decoding of
    # b"sk-\xff" would let that byte pass for it.
    async with (
        fake_replicas(1) as (replica,),
        keyed_gateway(tmp_path, [replica]) as (gw, _),
    ):
        config = gateway_config([replica], "random", auth=_auth({"name": "q", "key": "sk-?"}))
        write_config(tmp_path / "g.yaml", config)
        await wait_until(lambda: "q" in _auth_keys(gw))
        answers = []
        for key in (b"\x80\xff", b"sk-\xff", b"sk-\xef\xbf\xbd", KEY_A.encode() + b"\xe9", b"\xc3"):
            for path in (b"/v1/completions", b"/v1/jobs", b"/v1/models"):
                head = b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s" % (path, key)
                answers.append(await exchange(gw.url, head + b"\r\nContent-Length: 0"))
        good = await exchange(gw.url, b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-?")
    assert {(a.status, a.json()["error"]["type"]) for a in answers} == {(401, "unauthorized")}
    assert good.status == 200
    assert [seen["path"] for seen in replica.seen] == ["/x"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
