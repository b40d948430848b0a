"""Health, load, metrics and SageMaker endpoints on a real replica."""

from __future__ import annotations

from typing import Any

import aiohttp

from .conftest import Start


async def test_health_and_load_endpoints(start_replica: Start) -> None:
    url = await start_replica()
    async with aiohttp.ClientSession() as session:
        for path in (
            "/ping",
            "/health",
            "/v2/health/ready",
            "/v2/health/live",
            "/v2/models/classifier/ready",
        ):
            async with session.get(url + path) as response:
                assert response.status == 200, path
        async with session.get(f"{url}/load") as response:
            load = await response.json()
            header = response.headers["X-Replica-Load"]
        assert (load["queued"], load["running"]) == (0, 0)
        assert load["capacity"] == 16 + 32  # continuous max_num_seqs + dynamic max_batch_size
        assert header == "queued=0,running=0,capacity=48,backlog_tokens=0,inflight=0,kv_usage=0.000"


async def test_models_list_each_generative_models_limits(start_replica: Start) -> None:
    """A load generator reads what a request may ask for: vLLM's `max_model_len` (the context
    length, prompt and output together) and our `max_tokens_limit` (output tokens)."""
    url = await start_replica()  # tiny-gpt: context_len 256, max_tokens_limit 128
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models") as response:
            assert response.status == 200
            listed = {entry["id"]: entry for entry in (await response.json())["data"]}
        over = {"prompt": "x", "max_tokens": listed["tiny-gpt"]["max_tokens_limit"] + 1}
        async with session.post(f"{url}/v1/completions", json=over) as response:
            assert response.status == 400  # the limit listed is the one enforced
    assert listed["tiny-gpt"]["max_model_len"] == 256
    assert listed["tiny-gpt"]["max_tokens_limit"] == 128
    assert "max_model_len" not in listed["classifier"]


async def test_metrics_cover_queue_batch_compute_ttft_tpot(start_replica: Start) -> None:
    url = await start_replica()
    body = {"prompt": "metrics", "max_tokens": 5}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
    for name in (
        "replica_queue_wait_seconds_count",
        "replica_batch_size_count",
        "replica_compute_seconds_count",
        "replica_ttft_seconds_count",
        "replica_tpot_seconds_count",
        "replica_queue_depth",
        "replica_running_sequences",
        "replica_requests_total",
    ):
        assert f'{name}{{model="tiny-gpt"}}' in text or name in text, name
    assert 'replica_ttft_seconds_count{model="tiny-gpt"} 1.0' in text


async def test_invocations_routes_completion_and_tensor_bodies(start_replica: Start) -> None:
    url = await start_replica()
    async with aiohttp.ClientSession() as session:
        body: dict[str, Any] = {"prompt": "sagemaker", "max_tokens": 3, "temperature": 0}
        async with session.post(f"{url}/invocations", json=body) as response:
            assert response.status == 200
            assert (await response.json())["usage"]["completion_tokens"] == 3
        body = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 16], "data": [0.1] * 32}]
        }
        async with session.post(f"{url}/invocations", json=body) as response:
            assert response.status == 200
            assert (await response.json())["outputs"][0]["shape"] == [2, 4]
        async with session.post(f"{url}/invocations", json={"nothing": 1}) as response:
            assert response.status == 400
