"""`routing.explain`: each response says why it went where it went (X-Infergate-Decision), as a
client reads it: the strategy and reason, and for a policy that chooses by cost the chosen
replica's cost and the runner-up's; without it, no header."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.servers import fake_replicas, gateway_config, running_gateway, write_config

PROMPT = "A shared system prompt that the gateway hashes into blocks. " * 4


def fields(header: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in header.split("; "))


async def post(client: aiohttp.ClientSession, url: str) -> tuple[str, dict[str, str] | None]:
    body: dict[str, Any] = {"model": "m", "prompt": PROMPT, "max_tokens": 1}
    async with client.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200
        header = response.headers.get("X-Infergate-Decision")
        return response.headers["X-Infergate-Replica"], fields(header) if header else None


async def test_a_cost_policy_names_its_cost_and_the_runner_ups(tmp_path: Path) -> None:
    async with fake_replicas(2) as replicas, aiohttp.ClientSession() as client:
        config = gateway_config(replicas, "prefix_aware", load_feedback={"poll_interval_s": 0})
        config["routing"]["explain"] = True
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gateway:
            first, decision = await post(client, gateway.url)
            assert decision is not None
            assert decision["strategy"] == "prefix_aware" and decision["reason"] == '"free slot"'
            other = next(r.url for r in replicas if r.url != first)
            assert decision["runner_up"] == other
            again, decision = await post(client, gateway.url)  # its prefix is held there now
            assert again == first and decision is not None
            assert float(decision["cost"]) < float(decision["runner_up_cost"])


@pytest.mark.parametrize("explain", [True, False])
async def test_a_policy_without_costs_says_what_it_can_and_off_means_no_header(
    tmp_path: Path, explain: bool
) -> None:
    async with fake_replicas(2) as replicas, aiohttp.ClientSession() as client:
        config = gateway_config(replicas, "round_robin")
        config["routing"]["explain"] = explain
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gateway:
            _, decision = await post(client, gateway.url)
    if explain:
        assert decision == {"strategy": "round_robin", "reason": '"free slot"'}
    else:
        assert decision is None
