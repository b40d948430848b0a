"""Model-name routing and engine load feedback, end to end: our own replicas serving different
model names, and upstreams speaking vLLM's, SGLang's and TGI's documented /v1/models and
/metrics (tests/support/engines.py), behind a real gateway; asserted on what clients see."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from replica.config import parse_config
from replica.keys import STATE
from replica.server import create_app
from tests.support.engines import FakeEngine, fake_engines
from tests.support.servers import Gateway, running_gateway, serve, wait_until, write_config

FAST = {"served_models": {"interval_s": 0.05}, "reload": {"poll_interval_s": 0.1}}


@asynccontextmanager
async def our_replica(name: str) -> AsyncIterator[str]:
    """Our replica (simulated engine) serving tiny-gpt under the served name `name`."""
    config = {
        "server": {"port": 0},
        "engine": {"kind": "simulated"},
        "models": [{"kind": "tiny-gpt", "name": name, "max_tokens_limit": 8}],
    }
    app = create_app(parse_config(config))
    async with serve(app) as url:
        await app[STATE].settled.wait()
        yield url


def config_for(urls: list[str], **extra: Any) -> dict[str, Any]:
    return {"replicas": [{"url": u} for u in urls], **FAST, **extra}


async def listed(gateway: Gateway, *models: str) -> None:
    """Until the gateway's GET /v1/models lists every one of `models`."""
    await wait_until(lambda: set(models) <= set(gateway.state.pool.catalog()), timeout_s=10)


async def post(
    client: aiohttp.ClientSession, url: str, model: str, path: str = "/v1/completions"
) -> tuple[int, dict[str, Any], str | None]:
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    async with client.post(f"{url}{path}", json=body) as response:
        return response.status, await response.json(), response.headers.get("X-Infergate-Replica")


async def test_each_request_reaches_a_replica_that_serves_its_model(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as client:
        alpha = await stack.enter_async_context(our_replica("alpha"))
        beta = await stack.enter_async_context(our_replica("beta"))
        write_config(path, config_for([alpha, beta]))
        async with running_gateway(path) as gateway:
            await listed(gateway, "alpha", "beta")
            sdk = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
            assert {m.id for m in (await sdk.models.list()).data} == {"alpha", "beta"}
            assert (await sdk.models.retrieve("beta")).id == "beta"

            async def one(model: str) -> str | None:
                status, body, served = await post(client, gateway.url, model)
                assert status == 200, body
                assert body["model"] == model
                return served

            served = await asyncio.gather(*(one(m) for m in ["alpha", "beta"] * 15))
            assert served == [alpha, beta] * 15
            reply = await sdk.chat.completions.create(
                model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert reply.model == "beta"

            with pytest.raises(openai.NotFoundError) as caught:
                await sdk.completions.create(model="gamma", prompt="x", max_tokens=2)
            error = caught.value.body
            assert isinstance(error, dict)  # the SDK hands over the "error" object
            assert error["type"] == "model_not_found"
            assert error["message"] == "model 'gamma' is not served; available: alpha, beta"
            with pytest.raises(openai.NotFoundError):
                await sdk.models.retrieve("gamma")
            await sdk.close()

            async with client.get(f"{gateway.url}/metrics") as response:
                text = await response.text()
            counts = {
                s.labels["model"]: s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "gateway_model_requests_total" and s.labels["code"] == "2xx"
            }
            assert counts == {"alpha": 15, "beta": 16}


async def test_an_alias_added_by_a_hot_reload_routes_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with (
        fake_engines(FakeEngine("a", models=["tiny-gpt"]), FakeEngine("b", models=["big"])) as (
            a,
            b,
        ),
        aiohttp.ClientSession() as client,
    ):
        write_config(path, config_for([a.url, b.url]))
        async with running_gateway(path) as gateway:
            await listed(gateway, "tiny-gpt", "big")
            status, body, _ = await post(client, gateway.url, "chat")
            assert status == 404 and body["error"]["type"] == "model_not_found"

            aliased = {"models": [{"name": "chat", "target": "tiny-gpt"}]}
            write_config(path, config_for([a.url, b.url], **aliased))
            await wait_until(lambda: bool(gateway.state.runtime.config.models), timeout_s=5)
            status, body, served = await post(client, gateway.url, "chat")
            assert (status, served, body["engine"]) == (200, a.url, "a")
            assert json.loads(a.seen[-1]["body"])["model"] == "tiny-gpt"  # rewritten for it
            # KServe v2: the model is in the path, and the path is rewritten too.
            async with client.post(f"{gateway.url}/v2/models/chat/infer", json={}) as response:
                assert response.status == 200
                assert (await response.json())["path"] == "/v2/models/tiny-gpt/infer"
            models = await (await client.get(f"{gateway.url}/v1/models")).json()
            cards = {m["id"]: m for m in models["data"]}
            assert set(cards) == {"tiny-gpt", "big", "chat"}
            assert cards["chat"]["parent"] == "tiny-gpt"


async def test_lora_adapters_route_like_models_and_a_downed_model_is_a_503(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.yaml"
    base = FakeEngine("base", models=["llama"], adapters={"sql-lora": "llama"})
    other = FakeEngine("other", models=["mistral"])
    async with fake_engines(base, other), aiohttp.ClientSession() as client:
        health = {"engine": "vllm", "interval_s": 0.05, "unhealthy_threshold": 1}
        write_config(path, config_for([base.url, other.url], health_check=health))
        async with running_gateway(path) as gateway:
            await listed(gateway, "llama", "sql-lora", "mistral")
            for _ in range(5):
                status, _, served = await post(client, gateway.url, "sql-lora")
                assert (status, served) == (200, base.url)
            base.healthy = False
            await wait_until(lambda: not gateway.state.pool.available_for("sql-lora"))
            status, body, _ = await post(client, gateway.url, "sql-lora")
            assert status == 503
            assert body["error"] == {
                "type": "no_healthy_replica",
                "message": "no healthy replica serves model 'sql-lora'; see /admin/replicas",
            }
            status, _, served = await post(client, gateway.url, "mistral")
            assert (status, served) == (200, other.url)  # the other model is unaffected


@pytest.mark.parametrize("engine", ["vllm", "sglang", "tgi"])
async def test_least_loaded_sends_nothing_to_the_replica_whose_engine_reports_a_queue(
    tmp_path: Path, engine: str
) -> None:
    path = tmp_path / "g.yaml"
    busy, idle = FakeEngine("busy", engine, waiting=50, running=8), FakeEngine("idle", engine)
    async with fake_engines(busy, idle), aiohttp.ClientSession() as client:
        feedback = {"source": engine, "poll_interval_s": 0.05, "max_age_s": 0.5}
        config = config_for(
            [busy.url, idle.url], routing={"strategy": "least_loaded"}, load_feedback=feedback
        )
        write_config(path, config)
        async with running_gateway(path) as gateway:
            await listed(gateway, "m")
            await wait_until(lambda: gateway.state.pool.get(busy.url).remote == 58)  # type: ignore[union-attr]
            served = [(await post(client, gateway.url, "m"))[2] for _ in range(20)]
            assert served == [idle.url] * 20

            # The page shows what the engine said.
            async with client.get(f"{gateway.url}/ui/status.json") as response:
                status = await response.json()
            row = next(r for r in status["replicas"] if r["url"] == busy.url)
            assert row["reported"]["queued"] == 50 and row["models"] == ["m"]
            assert status["load_source"] == engine

            # A scrape that fails is ignored once the last report is older than max_age_s:
            # the busy replica is judged by this gateway's own count again and gets traffic.
            busy.metrics_status = 500
            await asyncio.sleep(0.6)
            served = [(await post(client, gateway.url, "m"))[2] for _ in range(20)]
            assert Counter(served)[busy.url] >= 5, Counter(served)


async def test_a_model_strategy_overrides_the_default_for_that_model_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.yaml"
    busy = FakeEngine("busy", models=["m", "n"], waiting=50)
    idle = FakeEngine("idle", models=["m", "n"])
    async with fake_engines(busy, idle), aiohttp.ClientSession() as client:
        config = config_for(
            [busy.url, idle.url],
            routing={"strategy": "least_loaded"},
            load_feedback={"source": "vllm", "poll_interval_s": 0.05},
            models=[{"name": "n", "strategy": "round_robin"}],
        )
        write_config(path, config)
        async with running_gateway(path) as gateway:
            await listed(gateway, "m", "n")
            await wait_until(lambda: gateway.state.pool.get(busy.url).remote == 50)  # type: ignore[union-attr]
            to_m = Counter([(await post(client, gateway.url, "m"))[2] for _ in range(10)])
            to_n = Counter([(await post(client, gateway.url, "n"))[2] for _ in range(10)])
            assert to_m == {idle.url: 10}
            assert to_n == {busy.url: 5, idle.url: 5}  # round robin ignores the queue


async def test_a_replica_without_a_model_list_still_serves_anything(tmp_path: Path) -> None:
    """Replicas with `models:` in the config are not polled; a replica whose /v1/models is a
    404 (SageMaker containers, plain HTTP services) takes any model, as before."""
    path = tmp_path / "g.yaml"
    listed_engine = FakeEngine("listed", models=["m"])
    async with fake_engines(listed_engine) as (engine,), aiohttp.ClientSession() as client:
        config = {
            "replicas": [{"url": engine.url, "models": ["configured"]}],
            **FAST,
        }
        write_config(path, config)
        async with running_gateway(path) as gateway:
            await asyncio.sleep(0.2)  # several poll intervals: it is never polled
            assert set(gateway.state.pool.catalog()) == {"configured"}
            status, body, _ = await post(client, gateway.url, "m")
            assert status == 404, body
            status, _, served = await post(client, gateway.url, "configured")
            assert (status, served) == (200, engine.url)


async def test_jobs_go_to_their_model_and_busy_engines_take_no_job(tmp_path: Path) -> None:
    """Deferred jobs route by model like real-time requests (an alias rewritten, an unknown
    model failed with the 404 a client gets), and only into idle capacity as the engines report
    it: a replica whose engine has a queue takes no job."""
    path = tmp_path / "g.yaml"
    small, big = FakeEngine("small", models=["small"]), FakeEngine("big", models=["big"])
    queued = FakeEngine("queued", models=["big"], waiting=20)
    async with fake_engines(small, big, queued), aiohttp.ClientSession() as client:
        config = config_for(
            [small.url, big.url, queued.url],
            load_feedback={"source": "vllm", "poll_interval_s": 0.05},
            models=[{"name": "large", "target": "big"}],
            jobs={"store": str(tmp_path / "jobs.db"), "poll_interval_s": 0.01},
        )
        write_config(path, config)
        async with running_gateway(path) as gateway:
            await listed(gateway, "small", "big")
            await wait_until(lambda: gateway.state.pool.get(queued.url).remote == 20)  # type: ignore[union-attr]
            lines = [
                {"custom_id": f"{i}", "method": "POST", "url": "/v1/completions",
                 "body": {"model": model, "prompt": "hi", "max_tokens": 2}}
                for i, model in enumerate(["small", "large", "big", "nope"] * 5)
            ]  # fmt: skip
            data = "\n".join(json.dumps(line) for line in lines).encode()
            async with client.post(f"{gateway.url}/v1/batches", data=data) as response:
                assert response.status == 202, await response.text()
                batch = await response.json()
            url = f"{gateway.url}/v1/batches/{batch['id']}"
            for _ in range(500):
                async with client.get(url) as response:
                    state = await response.json()
                if state["status"] in ("completed", "failed"):
                    break
                await asyncio.sleep(0.02)
            async with client.get(f"{url}/results") as response:
                results = [json.loads(line) for line in (await response.text()).splitlines()]
    by_id = {r["custom_id"]: r for r in results}
    assert len(by_id) == 20
    for i, model in enumerate(["small", "large", "big", "nope"] * 5):
        reply = by_id[str(i)]["response"]
        if model == "nope":
            assert reply["status_code"] == 404
            assert reply["body"]["error"]["type"] == "model_not_found"
        else:
            assert reply["status_code"] == 200
            assert reply["body"]["engine"] == ("small" if model == "small" else "big")
    assert not queued.seen  # its engine's queue kept every job away
    assert all(json.loads(s["body"])["model"] == "big" for s in big.seen)


async def test_our_replica_and_a_vllm_engine_serve_side_by_side(tmp_path: Path) -> None:
    """A mixed fleet: our replica serves `ours`, a vLLM-speaking engine serves `theirs` (and
    reports a queue, which least_loaded reads from its metrics while ours reports by header)."""
    path = tmp_path / "g.yaml"
    vllm = FakeEngine("vllm", models=["theirs"], waiting=3)
    async with (
        our_replica("ours") as ours,
        fake_engines(vllm),
        aiohttp.ClientSession() as client,
    ):
        config = config_for(
            [ours, vllm.url],
            routing={"strategy": "least_loaded"},
            load_feedback={"source": "vllm", "poll_interval_s": 0.05},
        )
        write_config(path, config)
        async with running_gateway(path) as gateway:
            await listed(gateway, "ours", "theirs")
            for model, where in [("ours", ours), ("theirs", vllm.url)] * 4:
                status, _, served = await post(client, gateway.url, model)
                assert (status, served) == (200, where)
            await wait_until(lambda: gateway.state.pool.get(vllm.url).remote == 3)  # type: ignore[union-attr]


async def test_jobs_of_a_model_that_is_down_wait_without_holding_up_the_others(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.yaml"
    up, down = FakeEngine("up", models=["a"]), FakeEngine("down", models=["b"])

    def sent(engine: FakeEngine) -> int:
        return sum(s["path"] == "/v1/completions" for s in engine.seen)

    async with fake_engines(up, down), aiohttp.ClientSession() as client:
        health = {"engine": "vllm", "interval_s": 0.05, "unhealthy_threshold": 1}
        config = config_for(
            [up.url, down.url],
            health_check=health,
            jobs={"store": str(tmp_path / "jobs.db"), "poll_interval_s": 0.01},
        )
        write_config(path, config)
        async with running_gateway(path) as gateway:
            await listed(gateway, "a", "b")
            down.healthy = False
            await wait_until(lambda: not gateway.state.pool.available_for("b"))
            lines = [
                {"custom_id": f"{i}", "url": "/v1/completions",
                 "body": {"model": model, "prompt": "hi", "max_tokens": 2}}
                for i, model in enumerate(["b", "a"] * 10)
            ]  # fmt: skip
            data = "\n".join(json.dumps(line) for line in lines).encode()
            async with client.post(f"{gateway.url}/v1/batches", data=data) as response:
                assert response.status == 202, await response.text()
                url = gateway.url + response.headers["Location"]
            await wait_until(lambda: sent(up) == 10, timeout_s=10)  # every "a" job, now
            async with client.get(url) as response:
                counts = (await response.json())["request_counts"]
            assert counts["completed"] == 10 and sent(down) == 0
            down.healthy = True
            await wait_until(lambda: sent(down) == 10, timeout_s=10)
            for _ in range(200):
                async with client.get(url) as response:
                    batch = await response.json()
                if batch["status"] == "completed":
                    break
                await asyncio.sleep(0.02)
            assert batch["request_counts"]["completed"] == 20, batch
