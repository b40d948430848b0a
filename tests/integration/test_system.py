"""The whole system as README's run command starts it: `infergate up` (replicas + gateway),
driven by clients we did not write (openai, tritonclient), then stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import pytest
import tritonclient.http as triton
import yaml
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from loadtests.harness.runner import free_port_block
from tests.support.processes import BIN, free_port, stop, wait_http_ok


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    port = free_port()
    config = {  # one replica per model: every request must find the replica of its model
        "groups": [
            {"replicas": 1, "models": ["tiny-gpt"]},
            {"replicas": 1, "models": ["classifier"]},
        ],
        "first_replica_port": free_port_block(2, start=31000),
        "kv_events_port": free_port_block(4, start=33000),
        # precise_prefix on the replicas' KV cache events, as `infergate up` turns them on
        "gateway": {
            "jobs": {"store": str(tmp_path / "jobs.db")},
            "routing": {"strategy": "precise_prefix"},
        },
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "infergate"), "up", "-c", str(path), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        stop(proc, timeout_s=40)


async def test_up_serves_openai_and_triton_clients_and_stops_clean(
    cluster: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, proc, log = cluster
    await wait_http_ok(f"{url}/readyz", proc, timeout_s=120)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as client:
        assert {m.id for m in (await client.models.list()).data} == {"tiny-gpt", "classifier"}
        completion = await client.completions.create(
            model="tiny-gpt", prompt="Hello, gateway", max_tokens=8, temperature=0
        )
        stream = await client.completions.create(
            model="tiny-gpt", prompt="Hello, gateway", max_tokens=8, temperature=0, stream=True
        )
        streamed = "".join([chunk.choices[0].text async for chunk in stream])
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert streamed == completion.choices[0].text

    def classify() -> np.ndarray:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            meta = client.get_model_metadata("classifier")
            size = int(meta["inputs"][0]["shape"][1])
            tensor = triton.InferInput("input", [2, size], "FP32")
            tensor.set_data_from_numpy(np.ones((2, size), dtype=np.float32))
            result: np.ndarray = client.infer("classifier", [tensor]).as_numpy("logits")
            return result
        finally:
            client.close()

    logits = await asyncio.to_thread(classify)
    assert logits.shape[0] == 2

    lines = [
        json.dumps({"custom_id": str(i), "url": "/v1/completions", "body": {
            "model": "tiny-gpt", "prompt": f"job {i}", "max_tokens": 4, "temperature": 0}})
        for i in range(3)
    ]  # fmt: skip
    results = await _run_batch(url, "\n".join(lines).encode())
    assert [r["custom_id"] for r in results] == ["0", "1", "2"]
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 4 for r in results)

    # The tiny-gpt replica published what its prefix cache stored, and the gateway follows it.
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as r:
        metrics = await r.text()
    held = [
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "gateway_kv_events_blocks"
    ]
    assert max(held, default=0) > 0, metrics[-2000:]

    async with aiohttp.ClientSession() as session, session.get(f"{url}/ui/status.json") as r:
        replicas = (await r.json())["replicas"]
    served = {tuple(r["models"]): r["requests_total"] for r in replicas}
    assert served[("tiny-gpt",)] >= 5 and served[("classifier",)] >= 1, served

    assert stop(proc, timeout_s=40) == 0, log.read_text()[-3000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left behind: {[p.pid for p in alive]}"
    output = log.read_text()
    assert "infergate is up: " + url in output


async def _run_batch(url: str, data: bytes) -> list[dict[str, Any]]:
    """A batch through the gateway's deferred jobs, on the real replicas; its result lines."""
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{url}/v1/batches", data=data) as response:
            assert response.status == 202, await response.text()
            batch_url = url + response.headers["Location"]
        for _ in range(600):
            async with client.get(batch_url) as response:
                if (await response.json())["status"] == "completed":
                    break
            await asyncio.sleep(0.05)
        async with client.get(f"{batch_url}/results") as response:
            return [json.loads(line) for line in (await response.text()).splitlines()]
