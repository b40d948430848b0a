"""Hot reload under load: a new strategy or replica list takes effect with no request lost;
an invalid file changes nothing and is reported."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support.servers import (
    Gateway,
    fake_replicas,
    gateway_config,
    running_gateway,
    wait_until,
    write_config,
)

ADMIN = {"Authorization": "Bearer t"}


async def _served_by(client: aiohttp.ClientSession, gw: Gateway, n: int) -> list[str]:
    names = []
    for _ in range(n):
        async with client.get(f"{gw.url}/echo") as response:
            assert response.status == 200
            names.append(response.headers["X-Infergate-Replica"])
    return names


async def test_strategy_edit_under_load_loses_nothing_and_applies_within_2s(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.yaml"
    async with fake_replicas(2) as replicas:
        config = gateway_config(replicas, "round_robin")
        del config["reload"]  # the default file poll, as users run it
        write_config(path, config)
        async with (
            running_gateway(path) as gw,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client,
        ):

            async def one() -> int:
                async with client.post(f"{gw.url}/sleep?s=0.3", data=b"{}") as response:
                    await response.read()
                    return response.status

            in_flight = [asyncio.create_task(one()) for _ in range(200)]
            await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            write_config(path, {**config, "routing": {"strategy": "least_outstanding_requests"}})
            edited_at = loop.time()
            statuses = await asyncio.gather(*in_flight)

            # One request held on a replica: least-outstanding now sends every new request to
            # the other one, where round robin would still alternate.
            held = asyncio.create_task(one_held(client, gw))
            await wait_until(lambda: sum(r.in_flight for r in replicas) == 1)
            pinned = next(r.url for r in replicas if r.in_flight)
            streak = 0
            while streak < 5:
                assert loop.time() - edited_at < 2.0, "routing did not follow the new strategy"
                streak = streak + 1 if (await _served_by(client, gw, 1)) != [pinned] else 0
            followed_after = loop.time() - edited_at
            for r in replicas:
                r.release.set()
            assert await held == 200
    assert statuses == [200] * 200
    assert followed_after < 2.0


async def one_held(client: aiohttp.ClientSession, gw: Gateway) -> int:
    async with client.get(f"{gw.url}/hold") as response:
        return response.status


async def test_invalid_edit_changes_nothing_and_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with fake_replicas(2) as replicas:
        config = gateway_config(replicas, "round_robin")
        write_config(path, config)
        async with (
            running_gateway(path, admin_token="t") as gw,
            aiohttp.ClientSession() as client,
        ):
            before = await _served_by(client, gw, 4)
            write_config(path, {**config, "routing": {"strategy": "fastest"}})
            await wait_until(lambda: _reloads(gw, "error") >= 1)
            after = await _served_by(client, gw, 4)
            async with client.post(f"{gw.url}/admin/reload", headers=ADMIN) as response:
                assert response.status == 422
                error = (await response.json())["error"]
            async with client.get(f"{gw.url}/metrics") as response:
                metrics = await response.text()
    # Round robin alternates before and after: the invalid file changed nothing.
    assert before[0::2] == [before[0]] * 2 and before[1::2] == [before[1]] * 2
    assert before[0] != before[1]
    assert set(after[0::2]) != set(after[1::2])
    assert error["type"] == "invalid_config"
    assert error["message"].startswith("routing.strategy: unknown strategy 'fastest'")
    assert 'gateway_config_reloads_total{result="error"} 2.0' in metrics
    assert 'gateway_routing_strategy_info{strategy="round_robin"} 1.0' in metrics


async def test_removed_replica_drains_and_added_one_serves(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with fake_replicas(3) as (a, b, c):
        write_config(path, gateway_config([a, b], "round_robin"))
        async with running_gateway(path, admin_token="t") as gw, aiohttp.ClientSession() as client:
            held = [asyncio.create_task(one_held(client, gw)) for _ in range(2)]
            await wait_until(lambda: a.in_flight == 1 and b.in_flight == 1)
            write_config(path, gateway_config([b, c], "round_robin"))
            await wait_until(lambda: _reloads(gw, "ok") >= 1)
            async with client.get(f"{gw.url}/admin/replicas", headers=ADMIN) as response:
                during = {r["url"]: r for r in (await response.json())["replicas"]}
            served = await _served_by(client, gw, 6)
            a.release.set()
            b.release.set()
            assert await asyncio.gather(*held) == [200, 200]
            async with client.get(f"{gw.url}/admin/replicas", headers=ADMIN) as response:
                after = [r["url"] for r in (await response.json())["replicas"]]
    assert during[a.url]["draining"] and during[a.url]["outstanding"] == 1
    assert not during[b.url]["draining"] and during[b.url]["outstanding"] == 1
    assert sorted(set(served)) == sorted([b.url, c.url])
    assert sorted(after) == sorted([b.url, c.url])


def _reloads(gw: Gateway, result: str) -> float:
    value = gw.metrics.registry.get_sample_value("gateway_config_reloads_total", {"result": result})
    return value or 0.0


SECRET = "hunter2-Kx9"
# 358 bytes, 43 million values once expanded: 19 s and 360 MB on the event loop before.
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{name}: &{name} [{','.join(['*' + above] * 9)}]\n"
    for above, name in itertools.pairwise("abcdefgh")
)


async def test_an_alias_bomb_is_refused_at_once_and_the_old_config_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "g.yaml"
    async with fake_replicas(2) as replicas:
        config = gateway_config(replicas, "round_robin")
        write_config(path, config)
        async with (
            running_gateway(path, admin_token="t") as gw,
            aiohttp.ClientSession() as client,
        ):
            bomb = BOMB + yaml.safe_dump(config) + "listen: *h\n"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(bomb)
            tmp.replace(path)
            await wait_until(lambda: _reloads(gw, "error") >= 1)  # the file watcher's
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with client.post(f"{gw.url}/admin/reload", headers=ADMIN) as response:
                assert response.status == 422
                error = (await response.json())["error"]
            elapsed = loop.time() - started
            served = await _served_by(client, gw, 4)
    assert elapsed < 1.0
    assert error["message"].startswith("(yaml) line ")
    assert "aliases expand to more than 10000 values" in error["message"]
    assert "previous config still serving: (yaml) line" in caplog.text
    assert served[0::2] == [served[0]] * 2 and served[0] != served[1]  # round robin still


async def test_a_refused_reload_shows_no_credential(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "g.yaml"
    async with fake_replicas(1) as replicas:
        config = gateway_config(replicas, "round_robin", reload={"watch": False})
        write_config(path, config)
        async with (
            running_gateway(path, admin_token="t") as gw,
            aiohttp.ClientSession() as client,
        ):
            bad_urls = [{"url": f"http://admin:{SECRET}@127.0.0.1:9"}]
            for edit in (
                {"jobs": {"store": f"mysql://admin:{SECRET}@db/jobs"}},
                {"jobs": {"store": f"postgresql://u@db:x/jobs?password={SECRET}"}},
                {"replicas": bad_urls},
            ):
                write_config(path, {**config, **edit})
                async with client.post(f"{gw.url}/admin/reload", headers=ADMIN) as response:
                    assert response.status == 422
                    body = await response.text()
                assert SECRET not in body and ("***" in body), body
            assert _reloads(gw, "error") == 3
    assert "refused, previous config still serving" in caplog.text
    assert SECRET not in caplog.text


async def test_a_slow_file_is_parsed_off_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with fake_replicas(1) as replicas:
        config = gateway_config(replicas, "round_robin")
        write_config(path, config)
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            # Valid YAML, refused at validation (unknown key): 15,000 values take seconds to
            # parse, which used to stall every request for as long.
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(config) + "padding:\n" + "  - 1\n" * 15_000)
            tmp.replace(path)
            loop = asyncio.get_running_loop()
            gaps: list[float] = []  # between answers: a stalled loop shows as a long one
            last, deadline = loop.time(), loop.time() + 60
            while _reloads(gw, "error") == 0:
                assert last < deadline, "the reload never finished"
                async with client.get(f"{gw.url}/healthz") as response:
                    assert response.status == 200
                gaps.append(loop.time() - last)
                last = loop.time()
                await asyncio.sleep(0.02)
    assert len(gaps) >= 3, gaps
    # Parsed on the loop, one gap would be the whole parse: most of the time the reload took.
    # Off it, no gap comes near that (a loaded machine stretches both alike).
    assert max(gaps) < max(0.5, sum(gaps) / 3), gaps
