"""Shared test set-up: every test must leave no asyncio task running behind it; `store`, the
jobs.store of a test that runs on each job store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loadtests.harness.pgserver import fresh_database


@pytest.fixture(autouse=True)
async def no_tasks_left() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while True:
        left = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
        if not left or loop.time() > deadline:
            break
        await asyncio.sleep(0.01)
    assert not left, f"tasks left running: {[t.get_name() for t in left]}"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """jobs.store: a file, or a new database on the test run's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.db")
    return await fresh_database(request.getfixturevalue("postgres_server"))
