"""The status page at /ui: its JSON from a real gateway, the switch that turns it off, and the
page itself rendered by headless Chromium (Debian's `chromium`) showing replicas and counts."""

from __future__ import annotations

import asyncio
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.servers import (
    FakeReplica,
    Gateway,
    fake_replicas,
    gateway_config,
    running_gateway,
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


async def _rendered(url: str, profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        *(CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu"),
        *("--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=3000"),
        *("--dump-dom", url),
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
