"""A replica that answers the gateway's control polls and load headers with hostile bytes: an
endless health body, non-ASCII or huge digits in X-Replica-Load, deeply nested or malformed
JSON on /load, /v1/models and /cache/blocks. Each stand-in is a hand-written aiohttp server on
loopback next to a well-behaved replica; what is asserted is what a client and an operator see
(answers, /admin/replicas, routing) and that the gateway's log holds no traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.routing.prefix import HASH_SCHEME, TOKENIZER
from gateway.routing.prefix_aware import PrecisePrefix
from tests.support.raw_upstream import fixed, raw_upstream
from tests.support.servers import (
    Gateway,
    fake_replicas,
    get_json,
    running_gateway,
    serve,
    wait_until,
    write_config,
)

ADMIN = {"Authorization": "Bearer t"}
DEEP = b"[" * 100_000 + b"]" * 100_000  # far past the JSON decoder's recursion limit
CHUNK = b"x" * 65536


@dataclass
class Probe:
    bytes_sent: int
    seconds: float


@dataclass
class StandIn:
    """A replica that answers the given paths as their handlers do, anything else plainly, and
    counts what it was asked."""

    url: str = ""
    probes: list[Probe] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)

    async def asked(self, path: str, times: int) -> None:
        """Wait (bounded) until `path` was asked `times` more times: whole poll rounds ran."""
        target = self.hits.get(path, 0) + times
        await wait_until(lambda: self.hits.get(path, 0) >= target)


def stand_in_app(stand_in: StandIn, routes: dict[str, Callable[..., Any]]) -> web.Application:
    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        stand_in.hits[request.path] = stand_in.hits.get(request.path, 0) + 1
        response: web.StreamResponse = await handler(request)
        return response

    async def plain(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"replica": "stand-in"})

    app = web.Application(middlewares=[count])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    app.router.add_route("*", "/{tail:.*}", plain)
    return app


@asynccontextmanager
async def stand_in(routes: dict[str, Callable[..., Any]]) -> AsyncIterator[StandIn]:
    replica = StandIn()
    async with serve(stand_in_app(replica, routes)) as url:
        replica.url = url
        yield replica


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks


async def replicas_by_url(client: aiohttp.ClientSession, gw: Gateway) -> dict[str, Any]:
    state = await get_json(client, f"{gw.url}/admin/replicas", headers=ADMIN)
    return {r["url"]: r for r in state["replicas"]}


# --- item 6: a health check judges the status and reads no body ---------------------------------


def endless(stand_in: StandIn, status: int) -> Callable[[web.Request], Any]:
    """A health answer whose body never ends (64 KiB every 5 ms) until the prober hangs up."""

    async def handler(request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started, sent = loop.time(), 0
        response = web.StreamResponse(status=status)
        try:
            await response.prepare(request)
            while True:
                await response.write(CHUNK)
                sent += len(CHUNK)
                await asyncio.sleep(0.005)
        except (ConnectionError, RuntimeError):
            pass  # the prober closed the connection
        finally:
            stand_in.probes.append(Probe(sent, loop.time() - started))
        return response

    return handler


async def test_a_health_check_judges_the_status_of_an_endless_body_and_hangs_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = StandIn(), StandIn()
    timeout_s = 2.0
    async with (
        serve(stand_in_app(good, {"/ping": endless(good, 200)})) as good.url,
        serve(stand_in_app(bad, {"/ping": endless(bad, 503)})) as bad.url,
    ):
        check = {"interval_s": 0.05, "timeout_s": timeout_s, "unhealthy_threshold": 1}
        config = {"replicas": [{"url": good.url}, {"url": bad.url}], "health_check": check}
        write_config(tmp_path / "g.yaml", config)
        async with (
            running_gateway(tmp_path / "g.yaml", admin_token="t") as gw,
            aiohttp.ClientSession() as client,
        ):
            await wait_until(lambda: len(good.probes) >= 3 and len(bad.probes) >= 3)
            replicas = await replicas_by_url(client, gw)
            for _ in range(3):
                async with client.post(f"{gw.url}/v1/completions", json={}) as response:
                    assert response.status == 200
                    assert response.headers["X-Infergate-Replica"] == good.url
    assert replicas[good.url]["healthy"] is True
    assert replicas[bad.url]["healthy"] is False
    for probe in good.probes + bad.probes:
        # Hung up at the status line: nowhere near the timeout, a few buffers at most.
        assert probe.seconds < timeout_s / 2, probe
        assert probe.bytes_sent < 8 * 1024 * 1024, probe
    no_tracebacks(caplog)


# --- item 7: X-Replica-Load is read by a strict ASCII rule --------------------------------------

HOSTILE_LOADS = [
    b"inflight=\xb2",  # superscript two in Latin-1: str.isdigit() says yes, int() says no
    b"inflight=\xb9\xb3",
    b"inflight=\xc2\xb2",  # the same in UTF-8
    b"inflight=\xd9\xa3",  # Arabic-Indic three in UTF-8: int() takes it, ASCII does not
    b"inflight=" + b"9" * 5000,  # past int()'s digit limit
    b"inflight=" + b"9" * 30,  # a count no replica holds
    b"inflight=-1",
    b"inflight=+1",
    b"inflight=1_000",
    b"inflight= 1e3",
    b"inflight=0x10",
    b"inflight=1.5",
    b"inflight",
    b",,=,",
]


@asynccontextmanager
async def raw_replica(load: bytes) -> AsyncIterator[str]:
    """A replica written on the socket, so its X-Replica-Load can hold any bytes: it answers
    every request (keep-alive, Content-Length bodies) with the same small JSON."""
    headers = b"Content-Type: application/json\r\nX-Replica-Load: " + load + b"\r\n"

    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(fixed(b'{"replica": "stand-in"}', headers))
        return True

    async with raw_upstream(answer) as upstream:
        yield upstream.url


@pytest.mark.parametrize("load", HOSTILE_LOADS, ids=range(len(HOSTILE_LOADS)))
async def test_a_hostile_load_header_gives_the_client_the_replicas_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, load: bytes
) -> None:
    async with raw_replica(load) as url:
        config = {
            "routing": {"strategy": "least_loaded"},
            "replicas": [{"url": url}],
            "load_feedback": {"poll_interval_s": 0},  # the header alone
            "served_models": {"path": None},
        }
        write_config(tmp_path / "g.yaml", config)
        async with (
            running_gateway(tmp_path / "g.yaml", admin_token="t") as gw,
            aiohttp.ClientSession() as client,
        ):
            for _ in range(3):
                async with client.post(f"{gw.url}/v1/completions", json={}) as response:
                    assert response.status == 200, await response.text()
                    assert await response.json() == {"replica": "stand-in"}
            (state,) = (await replicas_by_url(client, gw)).values()
    assert state["reported"] is None  # no count taken from it
    assert state["remote"] == 0 and state["outstanding"] == 0
    no_tracebacks(caplog)


# --- item 8 and the rule for every poller: one replica's bad answer costs only its own report ---

HOSTILE_JSON = [
    DEEP,
    b"\xff\xfe not UTF-8",
    b'{"data": ' + b"1" * 5000 + b"}",  # past int()'s digit limit
    b"{truncated",
]


def raw(body: bytes, status: int = 200) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json")

    return handler


@pytest.mark.parametrize("body", HOSTILE_JSON, ids=["deep", "not-utf8", "huge-int", "truncated"])
async def test_a_hostile_cache_report_costs_only_its_own_replica(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    good_blocks = [f"{h:016x}" for h in (1, 2, 3)]
    good_report = {
        "hash_scheme": HASH_SCHEME,
        "tokenizer": TOKENIZER,
        "block_size": 16,
        "blocks": good_blocks,
    }

    async def good_cache(request: web.Request) -> web.Response:
        return web.json_response(good_report)

    async with (
        stand_in({"/cache/blocks": raw(body)}) as hostile,
        stand_in({"/cache/blocks": good_cache}) as good,
    ):
        config = {
            "routing": {
                "strategy": "precise_prefix",
                "prefix": {"poll_interval_s": 0.05, "block_size": 16},
            },
            "replicas": [{"url": hostile.url}, {"url": good.url}],
        }
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            policy = gw.state.runtime.policy
            assert isinstance(policy, PrecisePrefix)
            await wait_until(lambda: policy.index.matched_blocks([1, 2, 3]) == {good.url: 3})
            await hostile.asked("/cache/blocks", 3)
    no_tracebacks(caplog)
    complaints = [r for r in caplog.records if hostile.url in r.getMessage()]
    assert len(complaints) == 1, [r.getMessage() for r in complaints]  # once, not every round


@pytest.mark.parametrize("body", HOSTILE_JSON, ids=["deep", "not-utf8", "huge-int", "truncated"])
async def test_a_hostile_model_list_costs_only_its_own_replica(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    async def good_list(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny-gpt"}]})

    async with (
        stand_in({"/v1/models": raw(body)}) as hostile,
        stand_in({"/v1/models": good_list}) as good,
    ):
        config = {
            "replicas": [{"url": hostile.url}, {"url": good.url}],
            "served_models": {"interval_s": 0.05},
        }
        write_config(tmp_path / "g.yaml", config)
        async with (
            running_gateway(tmp_path / "g.yaml", admin_token="t") as gw,
            aiohttp.ClientSession() as client,
        ):
            await hostile.asked("/v1/models", 3)
            replicas = await replicas_by_url(client, gw)
    assert replicas[good.url]["models"] == ["tiny-gpt"]
    assert replicas[hostile.url]["models"] is None
    no_tracebacks(caplog)
    complaints = [r for r in caplog.records if hostile.url in r.getMessage()]
    assert len(complaints) == 1, [r.getMessage() for r in complaints]


HOSTILE_LOAD_JSON: list[tuple[bytes, dict[str, float] | None]] = [
    *((body, None) for body in HOSTILE_JSON),
    (b'{"inflight": true}', None),
    (b'{"inflight": NaN}', None),
    (b'{"inflight": -1}', None),
    (b'{"inflight": "3"}', None),
    (b'{"inflight": 1e300}', None),
    (b'{"inflight": 100000000000000000000}', None),
    (b'{"inflight": 2.5}', None),
    (b"[1, 2]", None),
    (b'{"inflight": 1, "kv_usage": 7, "queued": -2, "x\\u00b2": 1}', {"inflight": 1}),
]


@pytest.mark.parametrize(("body", "taken"), HOSTILE_LOAD_JSON, ids=range(len(HOSTILE_LOAD_JSON)))
async def test_a_hostile_load_report_costs_only_its_own_replica(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, body: bytes, taken: dict[str, float] | None
) -> None:
    async def good_load(request: web.Request) -> web.Response:
        return web.json_response({"inflight": 7, "queued": 2, "kv_usage": 0.5})

    async with (
        stand_in({"/load": raw(body)}) as hostile,
        stand_in({"/load": good_load}) as good,
    ):
        config = {
            "routing": {"strategy": "least_loaded"},
            "replicas": [{"url": hostile.url}, {"url": good.url}],
            "load_feedback": {"poll_interval_s": 0.05},
        }
        write_config(tmp_path / "g.yaml", config)
        async with (
            running_gateway(tmp_path / "g.yaml", admin_token="t") as gw,
            aiohttp.ClientSession() as client,
        ):
            await hostile.asked("/load", 3)
            await good.asked("/load", 1)
            replicas = await replicas_by_url(client, gw)
    assert replicas[good.url]["reported"] == {"inflight": 7, "queued": 2, "kv_usage": 0.5}
    assert replicas[good.url]["remote"] == 7
    assert replicas[hostile.url]["reported"] == taken
    no_tracebacks(caplog)


async def test_a_replica_with_a_good_answer_is_heard_again_after_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The complaint is once per bad streak: a replica that recovers and fails again is named
    again, and its good reports count in between."""
    answers = [DEEP]

    async def flaky(request: web.Request) -> web.Response:
        return web.Response(body=answers[-1], content_type="application/json")

    async with stand_in({"/load": flaky}) as replica, fake_replicas(1):
        config = {"replicas": [{"url": replica.url}], "load_feedback": {"poll_interval_s": 0.05}}
        write_config(tmp_path / "g.yaml", config)
        caplog.set_level(logging.INFO)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            (state,) = gw.state.pool.all()
            await wait_until(lambda: any(replica.url in r.getMessage() for r in caplog.records))
            answers.append(b'{"inflight": 4}')
            await wait_until(lambda: state.reported == {"inflight": 4})
            answers.append(DEEP)
            await wait_until(
                lambda: sum(replica.url in r.getMessage() for r in caplog.records) >= 2
            )
    no_tracebacks(caplog)
