"""The status page at /ui: its JSON from a real gateway, the switch that turns it off, and the
page itself rendered by headless Chromium (Debian's `chromium`) showing replicas and counts, the
charts of the last minutes drawn from the gateway's history, and the recent decisions."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.flow.identity import CLASS_HEADER
from tests.support.servers import (
    FakeReplica,
    Gateway,
    fake_replicas,
    gateway_config,
    get_json,
    running_gateway,
    serve,
    wait_until,
    write_config,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def _hold(client: aiohttp.ClientSession, gw: Gateway) -> int:
    async with client.get(f"{gw.url}/hold") as response:
        return response.status


class ReplicaRows(HTMLParser):
    """{replica url: {field: text}} from the rendered table's data-replica / data-field cells."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.ids: dict[str, str] = {}
        self._row: dict[str, str] | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "tr" and attr.get("data-replica"):
            self._row = self.rows.setdefault(attr["data-replica"] or "", {})
        self._field = attr.get("data-field") or attr.get("id")

    def handle_data(self, data: str) -> None:
        if self._field is None:
            return
        if self._row is not None:
            self._row[self._field] = data
        else:
            self.ids.setdefault(self._field, data)

    def handle_endtag(self, tag: str) -> None:
        self._field = None
        if tag == "tr":
            self._row = None


async def _rendered(url: str, profile: Path, *action: str) -> str:
    """What headless Chromium prints after the page ran ~3 s: the DOM, by default."""
    proc = await asyncio.create_subprocess_exec(
        *(CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu"),
        *("--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=3000"),
        *(action or ("--dump-dom",)),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0
    return out.decode()


async def _held_requests(
    client: aiohttp.ClientSession, gw: Gateway, replicas: list[FakeReplica]
) -> list[asyncio.Task[int]]:
    """Round robin over two replicas: three held requests leave 2 on one and 1 on the other."""
    held = []
    for n in range(1, 4):
        held.append(asyncio.create_task(_hold(client, gw)))
        await wait_until(lambda n=n: sum(r.in_flight for r in replicas) == n)  # type: ignore[misc]
    return held


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
async def test_page_in_headless_chromium_shows_replicas_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with fake_replicas(2) as replicas:
        write_config(path, gateway_config(replicas, "round_robin"))
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            held = await _held_requests(client, gw, replicas)
            expected = {r.url: str(r.in_flight) for r in replicas}
            dom = await _rendered(f"{gw.url}/ui", tmp_path / "profile")
            for r in replicas:
                r.release.set()
            assert await asyncio.gather(*held) == [200] * 3
    page = ReplicaRows()
    page.feed(dom)
    assert {url: row.get("outstanding") for url, row in page.rows.items()} == expected
    assert {row.get("state") for row in page.rows.values()} == {"healthy"}
    assert page.ids["strategy"] == "round_robin"
    assert page.ids["outstanding"] == "3"


async def test_status_json_reports_pool_strategy_and_recent_traffic(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with fake_replicas(2) as replicas:
        write_config(path, gateway_config(replicas, "round_robin"))
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            for _ in range(4):
                async with client.get(f"{gw.url}/echo") as response:
                    assert response.status == 200
            held = await _held_requests(client, gw, replicas)
            async with client.get(f"{gw.url}/ui/status.json") as response:
                assert response.headers["Cache-Control"] == "no-store"
                status: dict[str, Any] = await response.json()
            for r in replicas:
                r.release.set()
            await asyncio.gather(*held)
    by_url = {r["url"]: r for r in status["replicas"]}
    assert status["strategy"] == "round_robin" and status["outstanding"] == 3
    assert sorted(r["outstanding"] for r in by_url.values()) == [1, 2]
    assert [by_url[r.url]["requests_total"] for r in replicas] in ([4, 3], [3, 4])
    assert [by_url[r.url]["recent"]["p50_s"] is not None for r in replicas] == [True, True]
    assert status["recent"]["requests_per_s"] > 0 and status["recent"]["p99_s"] > 0


async def test_switched_off_the_page_answers_404_and_is_not_proxied(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with fake_replicas(1) as replicas:
        config = gateway_config(replicas, "round_robin")
        write_config(path, config)
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            codes = {}
            for sub in ("", "/", "/status.js", "/status.json", "/other"):
                async with client.get(f"{gw.url}/ui{sub}", allow_redirects=False) as response:
                    codes[sub] = response.status
                    if sub in ("", "/"):  # the page, at /ui or /ui/ alike
                        assert response.content_type == "text/html"
            write_config(path, {**config, "ui": {"enabled": False}})
            await wait_until(lambda: not gw.state.runtime.config.ui.enabled)
            offs = set()
            for sub in ("", "/"):
                async with client.get(f"{gw.url}/ui{sub}") as response:
                    offs.add((response.status, (await response.json())["error"]["message"]))
    assert codes == {"": 200, "/": 200, "/status.js": 200, "/status.json": 200, "/other": 404}
    assert offs == {(404, "the status page is off (ui.enabled: false)")}
    assert replicas[0].seen == []


@dataclass
class CacheReplica:
    """A replica written inline: GET /hold answers once `release` is set, any other path at
    once; its GET /load reports prefix cache counts that grow by 100 looked-up tokens, 60 of
    them hits, with every request it serves (a hit rate of exactly 0.6)."""

    url: str = ""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    served: int = 0

    def app(self) -> web.Application:
        async def load(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "inflight": self.in_flight,
                    "prefix_cache_queried_tokens": 100 * self.served,
                    "prefix_cache_hit_tokens": 60 * self.served,
                }
            )

        async def hold(request: web.Request) -> web.Response:
            self.in_flight += 1
            try:
                await self.release.wait()
            finally:
                self.in_flight -= 1
            return await other(request)

        async def other(request: web.Request) -> web.Response:
            self.served += 1
            return web.json_response({"ok": True})

        async def no_model_list(request: web.Request) -> web.Response:
            return web.json_response({"error": "serves anything"}, status=404)

        app = web.Application()
        app.router.add_get("/load", load)
        app.router.add_get("/v1/models", no_model_list)
        app.router.add_get("/hold", hold)
        app.router.add_route("*", "/{tail:.*}", other)
        return app


@asynccontextmanager
async def _charted_gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, list[CacheReplica]]]:
    """Two replicas of one slot each, flow control with two classes, decisions explained."""
    replicas = [CacheReplica(), CacheReplica()]
    async with AsyncExitStack() as stack:
        for replica in replicas:
            replica.url = await stack.enter_async_context(serve(replica.app()))
        config = {
            "routing": {"strategy": "least_outstanding_requests", "explain": True},
            "replicas": [{"url": r.url, "max_concurrency": 1} for r in replicas],
            "load_feedback": {"poll_interval_s": 0.1},
            "flow_control": {"classes": [{"name": name} for name in CLASSES]},
            "reload": {"watch": False},
        }
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            yield gw, replicas
            for replica in replicas:
                replica.release.set()


CLASSES = ("interactive", "batch")
CHARTS = ("rate", "latency", "queued", "outstanding", "cache")


def _defined(values: list[Any]) -> list[Any]:
    return [v for v in values if v is not None]


async def _status_when(
    client: aiohttp.ClientSession, gw: Gateway, enough: Callable[[dict[str, Any]], bool],
    traffic: bool,
) -> dict[str, Any]:  # fmt: skip
    """/ui/status.json, read every 0.1 s (with a few requests before each read when `traffic`)
    until `enough` holds; bounded by a deadline, never by how fast this machine is."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        for _ in range(5 if traffic else 0):
            async with client.get(f"{gw.url}/echo") as response:
                assert response.status == 200
        status = await get_json(client, f"{gw.url}/ui/status.json")
        if enough(status):
            return status
        assert asyncio.get_running_loop().time() < deadline, status["history"]
        await asyncio.sleep(0.1)


def _joined(history: dict[str, Any], series: list[Any]) -> list[int]:
    """The points that have a value and are drawn joined to the one before (no gap)."""
    t = history["t_s"]
    return [
        i
        for i in range(1, len(t))
        if None not in (series[i - 1], series[i]) and t[i] - t[i - 1] <= history["gap_s"]
    ]


def _charted(status: dict[str, Any]) -> bool:
    """Two points in a row with traffic, latencies and a cache hit rate."""
    history = status["history"]
    rate = [r or None for r in history["requests_per_s"]]
    series = (rate, history["p50_s"], history["p99_s"], history["cache_hit_rate"])
    return all(_joined(history, s) for s in series)


class Charts(HTMLParser):
    """Each chart's drawn marks ({chart id: [point count of each polyline or circle]}) and the
    rendered decisions ({row: {field: text}})."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: dict[str, list[int]] = {}
        self.decisions: list[dict[str, str]] = []
        self._chart: str | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "svg" and (attr.get("id") or "").startswith("chart-"):
            self._chart = attr["id"]
            self.marks[attr["id"] or ""] = []
        elif tag == "polyline" and self._chart is not None:
            self.marks[self._chart].append(len((attr.get("points") or "").split()))
        elif tag == "circle" and self._chart is not None:
            self.marks[self._chart].append(1)
        elif tag == "tr" and attr.get("data-decision") is not None:
            self.decisions.append({})
        elif tag == "td" and self.decisions:
            self._field = attr.get("data-field")

    def handle_data(self, data: str) -> None:
        if self._field is not None:
            self.decisions[-1][self._field] = data

    def handle_endtag(self, tag: str) -> None:
        self._field = None
        if tag == "svg":
            self._chart = None


async def _echo(client: aiohttp.ClientSession, gw: Gateway, flow_class: str) -> int:
    async with client.get(f"{gw.url}/echo", headers={CLASS_HEADER: flow_class}) as response:
        return response.status


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
async def test_charts_of_the_last_minutes_and_recent_decisions(tmp_path: Path) -> None:
    shot = tmp_path / "status.png"
    async with _charted_gateway(tmp_path) as (gw, replicas), aiohttp.ClientSession() as client:
        await _status_when(client, gw, _charted, traffic=True)  # a point every 2 s
        held = [asyncio.create_task(_hold(client, gw)) for _ in replicas]  # one slot each
        await wait_until(lambda: all(r.in_flight == 1 for r in replicas))
        classes = ("interactive", "interactive", "batch")
        queued = [asyncio.create_task(_echo(client, gw, name)) for name in classes]
        await wait_until(lambda: gw.state.admission.queued == 3)
        busy = await _status_when(client, gw, _queue_charted, traffic=False)
        dom = await _rendered(f"{gw.url}/ui", tmp_path / "profile")
        window = "--window-size=1400,1500"
        await _rendered(f"{gw.url}/ui", tmp_path / "profile", window, f"--screenshot={shot}")
        for replica in replicas:
            replica.release.set()
        assert await asyncio.gather(*held, *queued) == [200] * 5
        await wait_until(lambda: gw.state.pool.outstanding == 0)  # every lease closed
        after = await get_json(client, f"{gw.url}/ui/status.json")
    urls = {r.url for r in replicas}
    history = busy["history"]
    assert set(history["outstanding"]) == urls and list(history["queued"]) == list(CLASSES)
    assert set(_defined(history["cache_hit_rate"])) == {0.6}  # 60 of every 100 tokens
    assert history["t_s"] == sorted(history["t_s"]) and -600 <= history["t_s"][0] <= 0
    assert len(history["t_s"]) == len(history["requests_per_s"]) == len(history["p99_s"])
    _assert_decisions(after["decisions"], urls)
    assert after["outstanding"] == 0 and after["queued"] == 0
    assert shot.read_bytes().startswith(b"\x89PNG")
    page = Charts()
    page.feed(dom)
    drawn = {name: max(marks, default=0) for name, marks in page.marks.items()}
    assert set(drawn) == {f"chart-{name}" for name in CHARTS} and min(drawn.values()) >= 2, drawn
    assert len(page.decisions) >= 2 and {row["replica"] for row in page.decisions} <= urls
    assert {row["strategy"] for row in page.decisions} == {"least_outstanding_requests"}


def _queue_charted(status: dict[str, Any]) -> bool:
    """A point taken with both replicas busy and three requests queued by class, drawn joined
    to the one before."""
    history = status["history"]
    return any(
        (history["queued"]["interactive"][i], history["queued"]["batch"][i]) == (2, 1)
        and all(series[i] == 1 for series in history["outstanding"].values())
        for i in _joined(history, history["queued"]["batch"])
    )


def _assert_decisions(decisions: list[dict[str, Any]], urls: set[str]) -> None:
    """The ring keeps the last 50, newest first, each with its costs (routing.explain): the
    chosen replica's is the lowest of those free at the choice; a request handed over from the
    queue is costed over every replica, so it has a runner-up."""
    assert len(decisions) == 50
    assert [d["at"] for d in decisions] == sorted((d["at"] for d in decisions), reverse=True)
    assert {d["reason"] for d in decisions[:5]} == {"free slot", "queued"}
    for d in decisions:
        assert d["replica"] in urls and d["code"] == 200 and d["cost"] is not None
        assert d["strategy"] == "least_outstanding_requests"
        if d["reason"] == "queued":
            assert d["runner_up"] in urls - {d["replica"]}
        if d["runner_up"] is not None:
            assert d["runner_up"] in urls - {d["replica"]} and d["runner_up_cost"] is not None
        if d["reason"] == "free slot" and d["runner_up"] is not None:
            assert d["cost"] <= d["runner_up_cost"]
    assert sum(d["runner_up"] is not None for d in decisions) >= 3
