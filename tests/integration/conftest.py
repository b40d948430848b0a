"""Fixtures for tests that need a real PostgreSQL server (loadtests/harness/pgserver.py): one server
for the whole run, started on first use, and a fresh database for each test; or a server of a
test's own, for a test that stops it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtests.harness.pgserver import PostgresServer, fresh_database, start_server


def _server() -> Iterator[PostgresServer]:
    try:
        server = start_server(durable=False)
    except FileNotFoundError as exc:  # not installed, and not installable here
        pytest.skip(str(exc))
    yield server
    server.remove()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    yield from _server()


@pytest.fixture
def stoppable_postgres_server() -> Iterator[PostgresServer]:
    """A server of the test's own, which it may stop and start (an outage), removed after."""
    yield from _server()


@pytest.fixture
async def postgres_url(postgres_server: PostgresServer) -> str:
    """postgresql://… of a new empty database."""
    return await fresh_database(postgres_server)
