"""Fault drills against real processes on loopback: crash, hang, cut streams, overload and a
hot reload that removes a replica, each under steady load. Prints, per drill, what clients saw
(requests sent, failed, retried by the gateway, P99 during the fault) and when the gateway took
the replica out of rotation and put it back.

    .venv/bin/python -m loadtests.chaos [--replicas 5] [--drills crash,hang,...]

Every drill is bounded in time and count and stops by itself. The tests in
tests/integration/test_chaos.py run the same drills, shorter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtests.analysis.stats import percentile
from loadtests.harness.fleet import Fleet, Observer, fleet
from loadtests.load.sse import StreamCheck


@dataclass
class Outcome:
    started: float  # time.monotonic()
    ended: float
    status: int
    complete: bool  # the whole answer arrived (a stream ended with [DONE])
    error_event: bool = False  # a cut stream ended with an SSE error event

    @property
    def failed(self) -> bool:
        return self.status != 200 or not self.complete


@dataclass
class Report:
    drill: str
    sent: int = 0
    failed: int = 0
    rejected_429: int = 0
    retried: float = 0
    p99_fault_s: float = float("nan")
    eject_s: float | None = None
    restore_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        return (
            f"{self.drill:14s} sent={self.sent:5d} failed={self.failed:3d} "
            f"429={self.rejected_429:4d} retried={self.retried:4.0f} "
            f"p99_fault={s(self.p99_fault_s)} s eject={s(self.eject_s)} s "
            f"restore={s(self.restore_s)} s  {'; '.join(self.notes)}"
        )


def completion(max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {
        "model": "tiny-gpt",
        "prompt": "chaos drill",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def one_request(client: aiohttp.ClientSession, url: str, body: dict[str, object]) -> Outcome:
    """A stream is complete only with `[DONE]` and no error event (loadtests/load/sse.py)."""
    started = time.monotonic()
    check = StreamCheck()
    complete = False
    status = 0
    try:
        async with client.post(f"{url}/v1/completions", json=body) as response:
            status = response.status
            if body.get("stream") and status == 200:
                async for line in response.content:
                    check.feed(line)
                complete = check.ok
            else:
                payload = await response.read()
                complete = status == 200 and b'"usage"' in payload
    except (aiohttp.ClientError, TimeoutError):
        complete = False
    return Outcome(started, time.monotonic(), status, complete, check.error is not None)


class Load:
    """Closed-loop clients that keep sending until stopped; every outcome is kept."""

    def __init__(self, url: str, clients: int, body: dict[str, object]) -> None:
        self.url, self.clients, self.body = url, clients, body
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        timeout = aiohttp.ClientTimeout(total=60)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=timeout
        )
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _client(self) -> None:
        while not self._stop.is_set():
            self.outcomes.append(await one_request(self._session, self.url, self.body))


def summarize(
    report: Report,
    outcomes: list[Outcome],
    fault: tuple[float, float],
    failed_if: Callable[[Outcome], bool] = lambda o: o.failed,
) -> Report:
    report.sent = len(outcomes)
    report.rejected_429 = sum(o.status == 429 for o in outcomes)
    failed = [o for o in outcomes if failed_if(o) and o.status != 429]
    report.failed = len(failed)
    if failed:
        kinds = Counter(f"{o.status}{'' if o.complete else ' incomplete'}" for o in failed)
        report.notes.append(f"failures: {dict(kinds)}")
    during = [o.ended - o.started for o in outcomes if fault[0] <= o.started <= fault[1]]
    report.p99_fault_s = percentile(during, 99)
    return report


@contextlib.asynccontextmanager
async def observing(url: str) -> AsyncIterator[Observer]:
    observer = Observer(url)
    task = asyncio.create_task(observer.run())
    try:
        yield observer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def fault(
    f: Fleet,
    name: str,
    inject: Callable[[], None],
    recover: Callable[[], None],
    victim_url: str,
    times: tuple[float, float, float],
    clients: int,
) -> Report:
    """Steady load; inject a fault after times[0] s, recover times[1] s later, run times[2] s
    more; report what clients saw and when the victim left and rejoined rotation."""
    before_s, during_s, after_s = times
    async with (
        observing(f.gateway_url) as seen,
        Load(f.gateway_url, clients, completion(8)) as load,
    ):
        await asyncio.sleep(before_s)
        injected = time.monotonic()
        inject()
        await asyncio.sleep(during_s)
        recover()
        recovered = time.monotonic()
        await asyncio.sleep(after_s)
    report = summarize(Report(name), load.outcomes, (injected, recovered))
    report.retried = await f.metric("gateway_retries_total")
    refused = await f.metric("gateway_retries_refused_total")
    if refused:
        report.notes.append(f"retries refused by the budget: {refused:.0f}")
    out = seen.first(victim_url, False, injected)
    back = seen.first(victim_url, True, recovered)
    report.eject_s = None if out is None else out - injected
    report.restore_s = None if back is None else back - recovered
    return report


async def crash(
    f: Fleet, before_s: float = 3, down_s: float = 10, after_s: float = 8, clients: int = 20
) -> Report:
    """kill -9 one replica under steady load, restart it `down_s` later."""
    victim = f.replicas[1]
    times = (before_s, down_s, after_s)
    return await fault(f, "crash", victim.kill9, victim.start, victim.url, times, clients)


async def hang(
    f: Fleet, before_s: float = 3, stopped_s: float = 8, after_s: float = 6, clients: int = 20
) -> Report:
    """SIGSTOP one replica (it accepts connections and never answers), SIGCONT it later."""
    victim = f.replicas[2]
    times = (before_s, stopped_s, after_s)
    return await fault(f, "hang", victim.pause, victim.resume, victim.url, times, clients)


async def stream_cut(f: Fleet, streams: int = 12) -> Report:
    """Long SSE streams; kill -9 one replica while they run. Cut streams must end with an SSE
    error event, never a silent close; the others complete."""
    victim = f.replicas[0]
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        tasks = [
            asyncio.create_task(one_request(client, f.gateway_url, completion(120, True)))
            for _ in range(streams)
        ]
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        victim.kill9()
        outcomes = await asyncio.gather(*tasks)
    victim.start()
    report = summarize(Report("stream_cut"), list(outcomes), (killed, time.monotonic()))
    cut = [o for o in outcomes if not o.complete]
    silent = [o for o in cut if not o.error_event]
    report.notes.append(
        f"{len(cut)} cut, {len(cut) - len(silent)} with an SSE error event, {len(silent)} silent"
    )
    report.failed = len(silent)  # a cut stream that says so is the contract, not a failure
    return report


async def overload(f: Fleet, burst: int = 400, steady_s: float = 4) -> Report:
    """A burst of ~10x what the fleet admits: fast 429s, bounded memory, then recovery."""
    rss_before = f.gateway_rss_bytes()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(one_request(client, f.gateway_url, completion(16)) for _ in range(burst))
        )
        ended = time.monotonic()
    rss_after = f.gateway_rss_bytes()
    report = summarize(Report("overload"), list(outcomes), (started, ended))
    rejected = [o.ended - o.started for o in outcomes if o.status == 429]
    report.notes.append(f"429 p99 {percentile(rejected, 99) * 1000:.0f} ms")
    report.notes.append(f"gateway RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    async with Load(f.gateway_url, 8, completion(8)) as after:
        await asyncio.sleep(steady_s)
    recovered = [o for o in after.outcomes if o.failed]
    report.notes.append(f"after the burst: {len(after.outcomes)} sent, {len(recovered)} failed")
    report.failed += len(recovered)
    return report


async def reload_remove(f: Fleet, clients: int = 20, after_s: float = 4) -> Report:
    """Rewrite the config without one replica while requests to it are in flight."""
    victim = f.replicas[-1]
    async with Load(f.gateway_url, clients, completion(48)) as load:
        await asyncio.sleep(2.0)
        edited = time.monotonic()
        config = dict(f.config)
        config["replicas"] = [{"url": r.url} for r in f.replicas if r is not victim]
        f.write_config(config)
        await asyncio.sleep(after_s)
    report = summarize(Report("reload_remove"), load.outcomes, (edited, time.monotonic()))
    report.notes.append(
        f"config reloads ok: {await f.metric('gateway_config_reloads_total', 'ok')}"
    )
    return report


OVERLOAD_LIMITS = {"max_outstanding_per_replica": 8, "max_queue": 16, "queue_timeout_s": 2.0}
Drill = Callable[[Fleet], Awaitable[Report]]
DRILLS: dict[str, tuple[Drill, dict[str, Any]]] = {
    "crash": (crash, {}),
    "hang": (hang, {}),
    "stream_cut": (stream_cut, {}),
    "overload": (overload, {"limits": OVERLOAD_LIMITS}),
    "reload_remove": (reload_remove, {}),
}


async def run_drills(names: list[str], replicas: int) -> list[Report]:
    reports = []
    for name in names:
        drill, overrides = DRILLS[name]
        with tempfile.TemporaryDirectory() as tmp:
            async with fleet(Path(tmp), replicas, **overrides) as f:
                report = await drill(f)
        print(report.line(), flush=True)
        reports.append(report)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--drills", default=",".join(DRILLS))
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args()
    reports = asyncio.run(run_drills(args.drills.split(","), args.replicas))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in reports], indent=2))


if __name__ == "__main__":
    main()
