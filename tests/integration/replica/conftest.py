"""Real replica servers on 127.0.0.1 ephemeral ports, torn down with no task left running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from replica.config import parse_config
from replica.keys import STATE
from replica.server import create_app

Start = Callable[..., Awaitable[str]]

CLASSIFIER_PARAMS = {"input_size": 16, "hidden_sizes": [32, 32], "num_classes": 4}


def small_config(
    gen_batcher: dict[str, Any] | None = None,
    cls_batcher: dict[str, Any] | None = None,
    **server: Any,
) -> dict[str, Any]:
    return {
        "server": {"port": 0, **server},
        "models": [
            {
                "kind": "tiny-gpt",
                "params": {"context_len": 256},
                "max_tokens_limit": 128,
                "batcher": gen_batcher or {"kind": "continuous"},
            },
            {
                "kind": "classifier",
                "params": CLASSIFIER_PARAMS,
                "batcher": cls_batcher or {"kind": "dynamic", "max_wait_ms": 2},
            },
        ],
    }


@pytest.fixture
async def start_replica() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(raw: dict[str, Any] | None = None) -> str:
        app = create_app(parse_config(raw or small_config()))
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        await app[STATE].settled.wait()
        assert app[STATE].phase == "ready", app[STATE].load_error
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftover == []
