"""How the control loops (and the jobs) ask replicas things: one aiohttp client session for
the gateway's own questions (SESSION, opened by the app), bodies read with a cap, the Fetch a
probe asks through (control/probe.py), and one way of logging a replica whose answers keep
failing.

Every way a hostile answer can fail (the connection, the clock, the size cap, the decoder) is
one of POLL_FAILURES, caught per replica; one log line per replica per bad streak, never a
traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping

import aiohttp
from aiohttp import web

from gateway.errors import clipped

SESSION = web.AppKey("client_session", aiohttp.ClientSession)
Session = Callable[[], aiohttp.ClientSession]  # the session, once the app has opened it
Answer = tuple[int, bytes]  # a replica's status, and the body of a 200 (else b"")
# GET url?params: the status, and the body of a 200 read up to max_bytes (0: not read, the
# status alone); any other answer's body is never read (an error page). Raises POLL_FAILURES.
Fetch = Callable[[str, Mapping[str, str] | None, int], Awaitable[Answer]]


class BodyOverLimit(Exception):
    """A replica body the gateway must hold whole is larger than it will hold."""


# What reading a replica's answer can raise: the connection, the clock, the size cap, and the
# decoder (ValueError covers malformed JSON, UnicodeDecodeError and over-long integers;
# RecursionError deep nesting). A poller catches these per replica and nothing else, so a bug
# of ours still shows.
POLL_FAILURES = (aiohttp.ClientError, TimeoutError, BodyOverLimit, ValueError, RecursionError)


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or BodyOverLimit as soon as it passes `limit` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise BodyOverLimit(f"{response.content_length} bytes")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise BodyOverLimit(f"over {limit} bytes")
    return bytes(body)


def session_fetch(session: Session) -> Fetch:
    """A Fetch through the gateway's session (control/probe.py sets the clock around it)."""

    async def fetch(url: str, params: Mapping[str, str] | None, max_bytes: int) -> Answer:
        # An unread body is not drained: leaving the block releases the connection, which
        # aiohttp keeps only when the whole body had come already (else it closes it).
        async with session().get(url, params=params) as response:
            if response.status != 200 or max_bytes == 0:
                return response.status, b""
            return 200, await read_capped(response, max_bytes)

    return fetch


class PollFailures:
    """A poller's failed replicas: each named once when its polls start failing (a poller runs
    every second or faster, and a line a round would bury the log), without a traceback (the
    fault is in the replica's answer, not here), and again only after a good poll."""

    def __init__(self, logger: logging.Logger, poller: str, consequence: str) -> None:
        self._log = logger
        self._poller = poller
        self._consequence = consequence
        self._failing: set[str] = set()

    def failed(self, url: str, error: BaseException) -> None:
        if url not in self._failing:
            self._failing.add(url)
            reason = clipped(str(error)) or "no detail"
            self._log.warning(
                "%s: %s failed (%s: %s); %s",
                self._poller, url, type(error).__name__, reason, self._consequence,
            )  # fmt: skip

    def ok(self, url: str) -> None:
        self._failing.discard(url)

    def keep(self, urls: Collection[str]) -> None:
        """Forget replicas that left the pool (discovery may replace every address)."""
        self._failing.intersection_update(urls)
