"""Work-aware and affinity routing as a client of a real gateway sees it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import aiohttp

from tests.support.servers import (
    fake_replicas,
    gateway_config,
    running_gateway,
    wait_until,
    write_config,
)

ADMIN = {"Authorization": "Bearer t"}


async def test_outstanding_tokens_follow_a_stream_and_steer_the_next_request(
    tmp_path: Path,
) -> None:
    async with fake_replicas(2) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "least_outstanding_tokens"))
        async with (
            running_gateway(tmp_path / "g.yaml", admin_token="t") as gw,
            aiohttp.ClientSession() as client,
        ):
            long = {"prompt": "x" * 40, "max_tokens": 100, "stream": True}  # 10 + 100 tokens
            async with client.post(f"{gw.url}/sse?n=4&gate=1", json=long) as stream:
                first = await stream.content.readuntil(b"\n\n")
                assert first.startswith(b"data:")
                busy = stream.headers["X-Infergate-Replica"]
                tokens = {r.url: r.outstanding_tokens for r in gw.state.pool.all()}
                assert tokens[busy] == 110 - 1  # one event relayed
                # Two short requests both go to the other replica: 1 + 2 requests, fewer tokens.
                for _ in range(2):
                    short = {"prompt": "y", "max_tokens": 5}
                    async with client.post(f"{gw.url}/echo", json=short) as r:
                        assert r.headers["X-Infergate-Replica"] != busy
                for replica in replicas:
                    replica.release.set()
                await stream.read()
            await wait_until(lambda: all(r.outstanding_tokens == 0 for r in gw.state.pool.all()))
            async with client.get(f"{gw.url}/admin/replicas", headers=ADMIN) as r:
                state = await r.json()
            assert [rep["outstanding_tokens"] for rep in state["replicas"]] == [0, 0]


async def test_affinity_keeps_a_session_on_one_replica_and_spreads_sessions(
    tmp_path: Path,
) -> None:
    async with fake_replicas(3) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "affinity"))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:

            async def route(session: str) -> str:
                headers = {"X-Session-Id": session}
                async with client.post(f"{gw.url}/echo", json={}, headers=headers) as r:
                    assert r.status == 200
                    return r.headers["X-Infergate-Replica"]

            homes = {}
            for i in range(60):
                picks = {await route(f"user-{i}") for _ in range(3)}
                assert len(picks) == 1, picks
                homes[i] = picks.pop()
            assert len(Counter(homes.values())) == 3

            # The prompt prefix is the key when no header is sent.
            async def by_prompt(prompt: str) -> str:
                async with client.post(f"{gw.url}/echo", json={"prompt": prompt}) as r:
                    return r.headers["X-Infergate-Replica"]

            system = "You are a terse assistant. " * 20  # > 256 characters shared
            picks = {await by_prompt(system + f"question {i}") for i in range(8)}
            assert len(picks) == 1
