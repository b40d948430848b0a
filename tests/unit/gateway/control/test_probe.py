"""The probe loop, driven round by round: a fake fetch (the injectable edge: what each replica
answers) and a ticker in place of asyncio.sleep, with the real probes, pool and policies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import pytest

from gateway.config import parse_config
from gateway.control.cache_blocks import CacheBlocksProbe
from gateway.control.fetch import Answer
from gateway.control.health import HealthChecker
from gateway.control.load import LoadProbe
from gateway.control.models import NEW_REPLICA_CHECK_S, ModelsProbe
from gateway.control.probe import Probe, ProbeLoop, poll_timeout
from gateway.pool.live import Live, build_runtime
from gateway.pool.replicas import ReplicaPool
from gateway.routing.prefix import HASH_SCHEME, TOKENIZER
from gateway.routing.prefix_aware import PrecisePrefix

T = TypeVar("T")
A, B, C = "http://a", "http://b", "http://c"
HANG = object()  # an answer that never comes


class Ticker:
    """asyncio.sleep's stand-in: the loop's sleeps wait here until the test lets them go."""

    def __init__(self) -> None:
        self._asleep: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()
        self._waking: asyncio.Future[None] | None = None

    async def sleep(self, seconds: float) -> None:
        wake = asyncio.get_running_loop().create_future()
        await self._asleep.put((seconds, wake))
        await wake

    async def next(self) -> float:
        """End the loop's current sleep (if any); how long its next one is."""
        if self._waking is not None:
            self._waking.set_result(None)
        seconds, self._waking = await asyncio.wait_for(self._asleep.get(), 5)
        return seconds


class Replicas:
    """A fetch: each replica's answer (status and body, an exception, or HANG), whatever the
    path; records what was asked."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, Mapping[str, str] | None, int]] = []

    async def __call__(self, url: str, params: Mapping[str, str] | None, max_bytes: int) -> Answer:
        self.asked.append((url, params, max_bytes))
        answer = self.answers["/".join(url.split("/", 3)[:3])]
        if answer is HANG:
            await asyncio.Event().wait()
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    def urls(self) -> list[str]:
        asked = sorted(url for url, _, _ in self.asked)
        self.asked.clear()
        return asked


def live_of(urls: list[str], **config: Any) -> Live:
    gateway = parse_config({"replicas": [{"url": url} for url in urls], **config})
    live = Live.start(build_runtime(gateway), ReplicaPool(gateway.replica_urls))
    live.swap(live.runtime)
    return live


def reconfigure(live: Live, **config: Any) -> None:
    urls = [replica.url for replica in live.pool.active()]
    gateway = parse_config({"replicas": [{"url": url} for url in urls], **config})
    live.swap(build_runtime(gateway, live.runtime))


@asynccontextmanager
async def running(probe: Probe[T], live: Live, fetch: Replicas) -> AsyncIterator[Ticker]:
    """The loop as a task; on leaving, it is still running (no round raised) and is ended."""
    ticker = Ticker()
    task = asyncio.create_task(ProbeLoop(probe, live, fetch, ticker.sleep).run())
    try:
        yield ticker
    finally:
        assert not task.done(), task
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def load(inflight: int) -> Answer:
    return 200, b'{"inflight": %d}' % inflight


def reported(live: Live) -> dict[str, Any]:
    return {replica.url: replica.reported for replica in live.pool.active()}


async def test_one_failing_replica_costs_only_its_own_report() -> None:
    live = live_of([A, B, C], load_feedback={"poll_interval_s": 0.5})
    fetch = Replicas(
        {
            A: aiohttp.ClientConnectionError("refused"),
            B: (200, b"<html>It works!</html>"),
            C: load(3),
        }
    )
    async with running(LoadProbe(live), live, fetch) as ticker:
        assert await ticker.next() == 0.5
        assert reported(live) == {A: None, B: None, C: {"inflight": 3}}
        fetch.answers[A], fetch.answers[C] = load(1), load(4)
        assert await ticker.next() == 0.5  # the loop goes on
        assert reported(live) == {A: {"inflight": 1}, B: None, C: {"inflight": 4}}
        assert fetch.asked[0] == (f"{A}/load", None, 4 * 1024 * 1024)


async def test_a_bad_streak_is_logged_once_and_again_after_a_good_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    live = live_of([A, B], load_feedback={"poll_interval_s": 0.5})
    fetch = Replicas({A: (200, b"[" * 100_000), B: load(1)})
    async with running(LoadProbe(live), live, fetch) as ticker:
        for _ in range(3):
            await ticker.next()
        fetch.answers[A] = load(2)
        await ticker.next()
        fetch.answers[A] = aiohttp.ServerDisconnectedError()
        await ticker.next()
        await ticker.next()
    lines = [r.getMessage() for r in caplog.records if A in r.getMessage()]
    assert lines == [
        f"load feedback: {A} failed (RecursionError: maximum recursion depth exceeded while "
        "decoding a JSON array from a unicode string); its last report ages out",
        f"load feedback: {A} failed (ServerDisconnectedError: Server disconnected); "
        "its last report ages out",
    ]
    assert not [r for r in caplog.records if B in r.getMessage() or r.exc_info]


async def test_the_timeout_is_the_interval_capped_or_the_configured_one() -> None:
    assert [poll_timeout(s) for s in (0.001, 0.3, 0.5, 2.0, 60.0)] == [0.25, 0.3, 0.5, 1.0, 1.0]
    live = live_of([A, B], load_feedback={"poll_interval_s": 0.3})
    fetch = Replicas({A: HANG, B: load(5)})
    async with running(LoadProbe(live), live, fetch) as ticker:
        started = time.monotonic()
        assert await ticker.next() == 0.3
        assert 0.29 < time.monotonic() - started < 1.0  # the hanging replica cut at 0.3 s
        assert reported(live) == {A: None, B: {"inflight": 5}}
    served = {"interval_s": 2.0, "timeout_s": 0.3}
    models = ModelsProbe(live_of([A], served_models=served)).plan()
    assert models is not None and models.timeout_s == 0.3
    checks = live_of([A], health_check={"interval_s": 5, "timeout_s": 0.2})
    health = HealthChecker(checks).plan()
    assert health is not None and (health.timeout_s, health.max_bytes) == (0.2, 0)
    blocks = live_of([A], routing={"strategy": "precise_prefix", "prefix": {"poll_interval_s": 3}})
    cache = CacheBlocksProbe(blocks).plan()
    assert cache is not None and cache.timeout_s == 1.0  # once min(2 s, interval)


async def test_off_is_looked_at_again_every_reload_interval_until_switched_on() -> None:
    live = live_of([A], load_feedback={"poll_interval_s": 0}, reload={"poll_interval_s": 3})
    fetch = Replicas({A: load(1)})
    async with running(LoadProbe(live), live, fetch) as ticker:
        assert await ticker.next() == 3
        assert await ticker.next() == 3
        assert fetch.asked == []
        reconfigure(live, load_feedback={"poll_interval_s": 0.25})
        assert await ticker.next() == 0.25
        assert fetch.urls() == [f"{A}/load"]
        reconfigure(live, load_feedback={"poll_interval_s": 0})
        assert await ticker.next() == 1.0  # off again, at the (default) reload interval
        assert fetch.asked == []


async def test_a_replica_that_left_is_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    live = live_of([A, B], health_check={"interval_s": 1, "unhealthy_threshold": 2})
    fetch = Replicas({A: aiohttp.ClientConnectionError("refused"), B: (200, b"")})
    checker = HealthChecker(live)
    load_probe = LoadProbe(live)
    async with running(checker, live, fetch) as ticker:
        await ticker.next()
        assert checker.streaks == {A: -1, B: 1}
        live.pool.update([B])
        await ticker.next()
        assert checker.streaks == {B: 2}
        live.pool.update([A, B])  # back, with no streak: one failure does not eject it
        await ticker.next()
        assert checker.streaks == {A: -1, B: 3}
        assert all(replica.healthy for replica in live.pool.all())
    reconfigure(live, load_feedback={"poll_interval_s": 0.5})
    fetch.answers[B] = load(1)
    async with running(load_probe, live, fetch) as ticker:
        await ticker.next()
        live.pool.update([B])
        await ticker.next()
        live.pool.update([A, B])  # failing again: named again
        await ticker.next()
    lines = [r for r in caplog.records if r.getMessage().startswith(f"load feedback: {A}")]
    assert len(lines) == 2


async def test_health_verdicts_follow_the_thresholds_and_off_heals_everyone() -> None:
    check = {"interval_s": 2, "unhealthy_threshold": 2, "healthy_threshold": 2, "path": "/h"}
    live = live_of([A, B], health_check=check)
    fetch = Replicas({A: (503, b""), B: TimeoutError()})
    checker = HealthChecker(live)
    a, b = live.pool.active()
    async with running(checker, live, fetch) as ticker:
        assert await ticker.next() == 2
        assert a.healthy and b.healthy  # one failure: not yet
        assert (f"{A}/h", None, 0) in fetch.asked  # the status alone, no body read
        await ticker.next()
        assert not a.healthy and not b.healthy
        fetch.answers[A] = (200, b"")
        await ticker.next()
        assert not a.healthy
        await ticker.next()
        assert a.healthy and not b.healthy
        reconfigure(live)  # health checks off: nothing would bring b back
        assert await ticker.next() == 1.0
        assert b.healthy and checker.streaks == {}


async def test_served_models_ask_a_joining_replica_at_once_and_tell_when_a_round_is_done() -> None:
    live = live_of([A], served_models={"interval_s": 0.3})
    fetch = Replicas({A: (200, b'{"data": [{"id": "m"}]}'), B: (404, b""), C: (500, b"")})
    a = live.pool.get(A)
    assert a is not None and not live.models_polled
    async with running(ModelsProbe(live), live, fetch) as ticker:
        assert await ticker.next() == NEW_REPLICA_CHECK_S
        assert live.models_polled and a.models == {"m"}
        assert fetch.urls() == [f"{A}/v1/models"]
        live.pool.update([A, B, C])
        await ticker.next()
        assert fetch.urls() == [f"{B}/v1/models", f"{C}/v1/models"]  # only the new ones
        await ticker.next()
        assert fetch.urls() == []
        await ticker.next()  # three steps of 0.1 s: a whole round
        assert fetch.urls() == [f"{A}/v1/models", f"{B}/v1/models", f"{C}/v1/models"]
    b, c = live.pool.get(B), live.pool.get(C)
    assert b is not None and b.models is None  # no endpoint: open to any model
    assert c is not None and c.models is None  # an error: nothing said


async def test_cache_blocks_are_asked_per_model_and_a_stranger_hash_counts_for_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    routing = {"strategy": "precise_prefix", "prefix": {"poll_interval_s": 0.5, "block_size": 16}}
    live = live_of([A, B, C], routing=routing)
    ours = b'{"hash_scheme": "%s", "tokenizer": "%s", "block_size": 16, "blocks": [%s]}'
    good = ours % (HASH_SCHEME.encode(), TOKENIZER.encode(), b'"0000000000000001"')
    other = good.replace(b'"block_size": 16', b'"block_size": 32')
    fetch = Replicas({A: (200, good), B: (200, other), C: (200, b'{"blocks": "none"}')})
    policy = live.runtime.policy
    assert isinstance(policy, PrecisePrefix)
    async with running(CacheBlocksProbe(live), live, fetch) as ticker:
        assert await ticker.next() == 0.5
        assert policy.index.matched_blocks([1]) == {A: 1}
        await ticker.next()
    warned = [r.getMessage() for r in caplog.records if B in r.getMessage()]
    assert len(warned) == 1 and "block_size=32" in warned[0]
    failed = [r.getMessage() for r in caplog.records if C in r.getMessage()]
    assert failed == [
        f"precise_prefix: {C} failed (BadReport: no list of blocks); it is taken to hold nothing"
    ]


async def test_a_bug_of_ours_is_not_taken_for_a_replicas_failure() -> None:
    live = live_of([A], load_feedback={"poll_interval_s": 0.5})
    fetch = Replicas({A: RuntimeError("a bug")})
    with pytest.raises(RuntimeError, match="a bug"):
        await ProbeLoop(LoadProbe(live), live, fetch, Ticker().sleep).run()
