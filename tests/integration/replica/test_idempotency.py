"""Idempotency-Key on a real replica (simulated engine): a repeated request is answered again
without running the model, a concurrent repeat waits for the first answer, a key reused for
another request is a 422, and streams, errors and bad keys are never kept or replayed."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from replica.config import parse_config
from replica.keys import STATE
from replica.server import create_app

from .conftest import Start

BODY = {"model": "tiny-gpt", "prompt": "hello", "max_tokens": 4, "temperature": 0}
SIMULATED = {
    "server": {"port": 0},
    "engine": {"kind": "simulated"},
    "models": [{"kind": "tiny-gpt", "max_tokens_limit": 64, "batcher": {"kind": "continuous"}}],
}


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Model runs (TTFT samples) and replays, from the replica's /metrics."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    found = {"runs": 0.0, "replays": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "replica_ttft_seconds_count":
                found["runs"] += sample.value
            elif sample.name == "replica_idempotent_replays_total":
                found["replays"] += sample.value
    return found


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str | None
) -> tuple[int, dict[str, Any], str | None]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers.get("Idempotent-Replayed")


async def test_a_repeated_key_is_answered_again_without_running_the_model(
    start_replica: Start,
) -> None:
    url = await start_replica(SIMULATED)
    async with aiohttp.ClientSession() as session:
        first = await _post(session, url, BODY, "job_1")
        again = await _post(session, url, BODY, "job_1")
        other = await _post(session, url, BODY, "job_2")
        plain = [await _post(session, url, BODY, None) for _ in range(2)]
        counts = await _metrics(session, url)
    assert first[0] == 200 and first[2] is None
    assert again == (200, first[1], "true")  # the same answer, id and all
    assert other[0] == 200 and other[1]["id"] != first[1]["id"] and other[2] is None
    assert all(status == 200 and replayed is None for status, _, replayed in plain)
    assert counts == {"runs": 4.0, "replays": 1.0}


async def test_a_repeat_while_the_first_is_running_waits_for_its_answer(
    start_replica: Start,
) -> None:
    url = await start_replica(SIMULATED)
    body = {**BODY, "max_tokens": 32}
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(_post(session, url, body, "job_x") for _ in range(3)))
        counts = await _metrics(session, url)
    assert [a[0] for a in answers] == [200] * 3
    assert len({a[1]["id"] for a in answers}) == 1
    assert sorted(str(a[2]) for a in answers) == ["None", "true", "true"]
    assert counts == {"runs": 1.0, "replays": 2.0}


async def test_a_key_reused_for_another_request_is_a_422_and_bad_keys_a_400(
    start_replica: Start,
) -> None:
    url = await start_replica(SIMULATED)
    async with aiohttp.ClientSession() as session:
        assert (await _post(session, url, BODY, "k"))[0] == 200
        status, error, _ = await _post(session, url, {**BODY, "prompt": "other"}, "k")
        assert status == 422 and error["error"]["type"] == "idempotency_key_reused"
        assert "use a new key for a new request" in error["error"]["message"]
        status, error, _ = await _post(session, url, BODY, "x" * 256)
        assert status == 400 and "Idempotency-Key: expected 1 to 255" in error["error"]["message"]
        counts = await _metrics(session, url)
    assert counts == {"runs": 1.0, "replays": 0.0}


async def test_errors_and_streams_are_not_kept(start_replica: Start) -> None:
    url = await start_replica(SIMULATED)
    async with aiohttp.ClientSession() as session:
        bad = {**BODY, "max_tokens": 10_000}  # over max_tokens_limit: a 400 each time
        assert [(await _post(session, url, bad, "e"))[::2] for _ in range(2)] == [(400, None)] * 2
        for _ in range(2):
            async with session.post(
                f"{url}/v1/completions", json={**BODY, "stream": True},
                headers={"Idempotency-Key": "s"},
            ) as response:  # fmt: skip
                assert response.status == 200 and "Idempotent-Replayed" not in response.headers
                assert (await response.text()).rstrip().endswith("data: [DONE]")
        counts = await _metrics(session, url)
    assert counts == {"runs": 2.0, "replays": 0.0}


async def test_a_waiting_repeat_runs_itself_when_the_first_goes_away_or_differs() -> None:
    # As `infergate replica` serves: a handler whose client went away is cancelled.
    app = create_app(parse_config(SIMULATED))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        await app[STATE].settled.wait()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        first, other, repeat = await _abandon_then_repeat(url)
    finally:
        await runner.cleanup()
    assert first == "timed out"
    assert other[0] == 422  # at once, while the first ran
    assert repeat[0] == 200 and repeat[2] is None  # ran itself: the first left no answer


async def _abandon_then_repeat(
    url: str,
) -> tuple[str, tuple[int, dict[str, Any], str | None], tuple[int, dict[str, Any], str | None]]:
    body = {**BODY, "max_tokens": 48}
    async with aiohttp.ClientSession() as session:

        async def abandoned() -> str:
            try:
                async with session.post(
                    f"{url}/v1/completions", json=body, headers={"Idempotency-Key": "k"},
                    timeout=aiohttp.ClientTimeout(total=0.2),
                ) as response:  # fmt: skip
                    return f"answered {response.status}"
            except TimeoutError:
                return "timed out"

        first = asyncio.create_task(abandoned())
        await asyncio.sleep(0.05)  # the first is running now
        other = await _post(session, url, {**BODY, "prompt": "another"}, "k")
        repeat = await _post(session, url, body, "k")
        return await first, other, repeat
