"""Flow control and per-key limits through a real gateway, in front of an inline OpenAI-style
replica on loopback: slots go by class, a request queued past its TTL is a 429 that says so,
a key over its limits gets OpenAI's 429 (the official client reads it and its retry succeeds),
reservations settle from usage (whole bodies and streams), and the tenants' tokens are counted.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from gateway.flow.identity import CLASS_HEADER, TENANT_HEADER
from gateway.pool.admission import DROPPED_HEADER
from tests.support.openai_replica import Replica
from tests.support.processes import BIN, free_port, stop, wait_http_ok
from tests.support.raw_http import exchange
from tests.support.servers import Gateway, running_gateway, serve, wait_until, write_config

KEY = "sk-tenant-a-0123456789"
CLASSES = [{"name": "interactive"}, {"name": "standard"}, {"name": "batch", "sheddable": True}]


@asynccontextmanager
async def gateway(tmp_path: Path, **extra: Any) -> AsyncIterator[tuple[Gateway, Replica]]:
    replica = Replica()
    async with serve(replica.app()) as url:
        config = {
            "replicas": [{"url": url, "max_concurrency": 1, "models": ["m"]}],
            "reload": {"watch": False},
            **extra,
        }
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            yield gw, replica
            replica.gate.set()


async def _complete(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, dict[str, str], Any]:
    payload = {"model": "m", "prompt": "hello", "max_tokens": 4, **body}
    async with client.post(f"{url}/v1/completions", json=payload, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.json()


async def test_slots_go_to_the_most_important_class_first_and_the_reply_names_it(
    tmp_path: Path,
) -> None:
    flow = {"classes": CLASSES, "default_class": "standard", "fairness": "fcfs"}
    async with gateway(tmp_path, flow_control=flow) as (gw, replica), aiohttp.ClientSession() as c:
        replica.gate.clear()
        first = asyncio.create_task(_complete(c, gw.url, prompt="first"))
        await wait_until(lambda: gw.state.pool.outstanding == 1)
        calls = [
            asyncio.create_task(_complete(c, gw.url, {CLASS_HEADER: cls}, prompt=cls))
            for cls in ("batch", "standard", "interactive")
        ]
        await wait_until(lambda: gw.state.admission.queued == 3)
        replica.gate.set()
        results = await asyncio.gather(first, *calls)
        assert replica.order == ["first", "interactive", "standard", "batch"]
        assert [headers[CLASS_HEADER] for _, headers, _ in results] == [
            "standard", "batch", "standard", "interactive",
        ]  # fmt: skip
        status, _, body = await _complete(c, gw.url, {CLASS_HEADER: "gold"})
        assert status == 400 and "not a class of this gateway" in body["error"]["message"]


async def test_a_request_queued_past_its_ttl_is_a_429_that_says_why(tmp_path: Path) -> None:
    flow = {"classes": CLASSES, "queue_ttl_s": 0.2}
    async with gateway(tmp_path, flow_control=flow) as (gw, replica), aiohttp.ClientSession() as c:
        replica.gate.clear()
        held = asyncio.create_task(_complete(c, gw.url))
        await wait_until(lambda: gw.state.pool.outstanding == 1)
        status, headers, body = await _complete(c, gw.url, {TENANT_HEADER: "bob"})
        assert status == 429 and headers[DROPPED_HEADER] == "ttl-expired"
        assert int(headers["Retry-After"]) >= 1
        assert "flow_control.queue_ttl_s" in body["error"]["message"]
        replica.gate.set()
        assert (await held)[0] == 200
        shed = gw.metrics.flow.shed.labels("batch", "ttl-expired")._value.get()
        assert shed == 1


def _keyed(limits: dict[str, int]) -> dict[str, Any]:
    return {"api_keys": [{"name": "team-a", "key": KEY, "limits": limits}]}


async def test_the_openai_client_gets_the_rate_limit_and_its_retry_succeeds(
    tmp_path: Path,
) -> None:
    """tokens_per_minute 600 refills 10 a second: one request of 591 tokens leaves 9; the
    next asks 20 and is refused for about a second; the client's own retry then passes."""
    async with gateway(tmp_path, auth=_keyed({"tokens_per_minute": 600})) as (gw, _):
        base = f"{gw.url}/v1"
        strict = AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0)
        patient = AsyncOpenAI(base_url=base, api_key=KEY, max_retries=3)
        try:
            raw = await strict.completions.with_raw_response.create(
                model="m", prompt="hi", max_tokens=590
            )
            assert raw.headers["x-ratelimit-limit-tokens"] == "600"
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) in range(9, 12)
            with pytest.raises(openai.RateLimitError) as refused:
                await strict.completions.create(model="m", prompt="hi", max_tokens=19)
            error = refused.value
            assert error.status_code == 429
            assert error.body["type"] == "rate_limit_exceeded"  # type: ignore[index]
            assert error.body["code"] == "tokens"  # type: ignore[index]
            assert "tokens_per_minute limit of 600" in error.message
            assert error.response.headers["x-ratelimit-limit-tokens"] == "600"
            assert int(error.response.headers["retry-after"]) in (1, 2)
            done = await patient.completions.create(model="m", prompt="hi", max_tokens=19)
            assert done.usage is not None and done.usage.completion_tokens == 19
        finally:
            await strict.close()
            await patient.close()


async def test_a_reservation_settles_from_the_usage_of_a_body_and_of_a_stream(
    tmp_path: Path,
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with (
        gateway(tmp_path, auth=_keyed({"tokens_per_minute": 6000})) as (gw, _),
        aiohttp.ClientSession() as c,
    ):
        # 1 + 500 reserved, 1 + 10 used: the 490 not used come back.
        status, first, _ = await _complete(
            c, gw.url, headers, prompt="hi", max_tokens=500, completion_tokens=10
        )
        assert status == 200 and int(first["x-ratelimit-remaining-tokens"]) in range(5499, 5502)
        _, second, _ = await _complete(c, gw.url, headers, prompt="hi", max_tokens=1)
        assert int(second["x-ratelimit-remaining-tokens"]) in range(5987, 5992)
        # A stream with a usage chunk settles from it; without one, from the events relayed.
        for options in ({"include_usage": True}, {}):
            async with c.post(
                f"{gw.url}/v1/completions",
                headers=headers,
                json={
                    "model": "m",
                    "prompt": "a b",
                    "max_tokens": 300,
                    "completion_tokens": 5,
                    "stream": True,
                    "stream_options": options,
                },
            ) as r:
                assert r.status == 200 and "x-ratelimit-limit-tokens" in r.headers
                await r.read()
        tokens = gw.metrics.flow.tokens
        await wait_until(lambda: tokens.labels("team-a", "completion")._value.get() >= 22)
        # The usage-less stream's prompt is the estimate (3 characters: 1 token), its completion
        # the events relayed (5 and [DONE]).
        assert tokens.labels("team-a", "prompt")._value.get() == 1 + 1 + 2 + 1
        assert tokens.labels("team-a", "completion")._value.get() == 10 + 1 + 5 + 6
        _, last, _ = await _complete(c, gw.url, headers, prompt="hi", max_tokens=1)
        assert int(last["x-ratelimit-remaining-tokens"]) in range(5960, 5975)


async def test_max_parallel_refuses_the_request_over_it_until_one_ends(tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with (
        gateway(tmp_path, auth=_keyed({"max_parallel": 1})) as (gw, replica),
        aiohttp.ClientSession() as c,
    ):
        replica.gate.clear()
        held = asyncio.create_task(_complete(c, gw.url, headers))
        await wait_until(lambda: gw.state.pool.outstanding == 1)
        status, _, body = await _complete(c, gw.url, headers)
        assert status == 429 and body["error"]["code"] == "parallel_requests"
        replica.gate.set()
        assert (await held)[0] == 200
        assert (await _complete(c, gw.url, headers))[0] == 200
        refused = gw.metrics.flow.refused.labels("team-a", "parallel_requests")._value.get()
        assert refused == 1


async def _both_workers_answer(url: str, timeout_s: float = 10.0) -> dict[int, float]:
    """Each worker's recent requests per second, once fresh connections have reached both."""
    seen: dict[int, float] = {}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(seen) < 2:
        assert asyncio.get_running_loop().time() < deadline, f"only worker(s) {seen} answered"
        async with aiohttp.ClientSession() as c, c.get(f"{url}/ui/status.json") as r:
            status = await r.json()
            seen[status["worker"]] = status["recent"]["requests_per_s"]
    return seen


async def test_a_keys_limits_hold_across_two_workers(tmp_path: Path) -> None:
    """`workers: 2`: requests_per_minute 20 admits 20 however the connections land (each
    worker alone would admit 20 of its own); the refills during the test add at most one."""
    replica = Replica()
    async with serve(replica.app()) as replica_url:
        port = free_port()
        config = {
            "replicas": [{"url": replica_url, "models": ["m"]}],
            "workers": 2,
            "listen": {"port": port},
            "auth": _keyed({"requests_per_minute": 20}),
        }
        write_config(tmp_path / "g.yaml", config)
        proc = subprocess.Popen([str(BIN / "infergate"), "gateway", "-c", str(tmp_path / "g.yaml")])
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_http_ok(f"{url}/readyz", proc)
            await _both_workers_answer(url)  # each listens once it is up
            statuses: list[int] = []
            for _ in range(40):
                async with aiohttp.ClientSession() as c:  # a fresh connection: either worker
                    status, _, _ = await _complete(c, url, {"Authorization": f"Bearer {KEY}"})
                    statuses.append(status)
            served = await _both_workers_answer(url)
            assert all(rate > 0 for rate in served.values()), f"one worker served all: {served}"
            assert set(statuses) == {200, 429}
            assert 20 <= statuses.count(200) <= 21
        finally:
            stop(proc, timeout_s=20)


async def test_the_status_page_lists_tenants_with_their_queue_service_and_tokens(
    tmp_path: Path,
) -> None:
    flow = {"classes": CLASSES, "default_class": "standard"}
    auth = {
        "api_keys": [
            {
                "name": "team-a",
                "key": KEY,
                "tenant": "acme",
                "class": "interactive",
                "weight": 2,
                "limits": {"requests_per_minute": 100},
            },
            {"name": "team-b", "key": "sk-b-0123456789", "tenant": "acme", "weight": 2},
        ]
    }
    async with (
        gateway(tmp_path, flow_control=flow, auth=auth) as (gw, replica),
        aiohttp.ClientSession() as c,
    ):
        headers = {"Authorization": f"Bearer {KEY}"}
        assert (await _complete(c, gw.url, headers, prompt="a b c", max_tokens=5))[0] == 200
        replica.gate.clear()
        held = asyncio.create_task(_complete(c, gw.url, headers))
        await wait_until(lambda: gw.state.pool.outstanding == 1)
        queued = asyncio.create_task(_complete(c, gw.url, headers))
        await wait_until(lambda: gw.state.admission.queued == 1)
        async with c.get(f"{gw.url}/ui/status.json") as r:
            status = await r.json()
        replica.gate.set()
        assert [(await t)[0] for t in (held, queued)] == [200, 200]
    (acme,) = status["tenants"]
    assert acme["tenant"] == "acme" and acme["keys"] == ["team-a", "team-b"]
    assert acme["classes"] == ["interactive", "standard"] and acme["weight"] == 2
    assert acme["limits"][0] == {"requests_per_minute": 100, "default_max_tokens": 256}
    assert acme["queued"] == 1 and acme["service"] > 0
    assert (acme["prompt_tokens"], acme["completion_tokens"]) == (3, 5)
    assert acme["rate_limited"] == 0


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (b"X-Infergate-Tenant: \xff\xfe bob", "is not a tenant name"),
        (b"X-Infergate-Tenant: " + b"t" * 5000, "is not a tenant name"),
        ("X-Infergate-Class: g\u00f6ld".encode(), "is not a class of this gateway"),
        (b"X-Infergate-Class: " + b"c" * 5000, "is not a class of this gateway"),
    ],
)
async def test_a_hostile_tenant_or_class_header_is_a_400_that_says_what_to_fix(
    tmp_path: Path, header: bytes, says: str
) -> None:
    flow = {"classes": CLASSES}
    async with gateway(tmp_path, flow_control=flow) as (gw, replica):
        body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 1}).encode()
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + header
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
        )
        answer = await exchange(gw.url, head, body)
        assert answer.status == 400 and says in answer.json()["error"]["message"]
        assert len(answer.json()["error"]["message"]) < 400  # the value is quoted clipped
        assert replica.served == 0
        async with aiohttp.ClientSession() as c:  # and the gateway serves on
            assert (await _complete(c, gw.url))[0] == 200
