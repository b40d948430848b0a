"""The upstream contract: what the relay needs of an HTTP/1.1 client, in one method.

`Upstream.send(request, timeouts)` returns once the response's head is in, or raises
UpstreamFailure naming why there is none (connect_error, reset, timeout, other). The response
gives its body chunk by chunk (`chunk`, b"" at the end), whole (`read`), or piped socket to
socket (`pipe`), and is handed back with `release` (its connection may be kept) or `close`.
gateway/datapath/h1client.py is the real one; gateway/datapath/mock.py is a double that
answers from a function, so the proxy's retry, relay and cut logic run without sockets (as
httpx ships MockTransport beside its transports).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict

from gateway.config import Timeouts


class UpstreamFailure(Exception):
    """The exchange with the replica failed; `reason` is the `retries.retry_on` name
    (connect_error, reset, timeout, other) and `detail` says what happened."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)  # not frozen: made for every request, and frozen costs ~0.3 us
class UpstreamRequest:
    replica_url: str  # scheme://host:port[/prefix] of the replica
    method: str
    path_qs: str  # starts with '/'
    headers: Sequence[tuple[str, str]]  # sent as given; Host and Content-Length are set
    body: bytes


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    connect_s: float
    headers_s: float  # from the request sent to the response's head
    idle_s: float  # the longest silence within the body
    total_s: float | None  # the whole exchange
    keepalive_s: float  # an idle connection older than this is not used again


_LAST: list[tuple[Timeouts, UpstreamTimeouts]] = []


def upstream_timeouts(timeouts: Timeouts) -> UpstreamTimeouts:
    """The config's timeouts as the upstream client takes them, made once per config (by
    identity: hashing the config's model on every request would cost more than this)."""
    if _LAST and _LAST[0][0] is timeouts:
        return _LAST[0][1]
    made = UpstreamTimeouts(
        connect_s=timeouts.connect_s,
        headers_s=min(timeouts.first_byte_s, timeouts.idle_s),
        idle_s=timeouts.idle_s,
        total_s=timeouts.total_s,
        keepalive_s=timeouts.upstream_keepalive_s,
    )
    _LAST[:] = [(timeouts, made)]
    return made


class UpstreamResponse(Protocol):
    status: int
    reason: str
    content_length: int | None

    def header(self, lower_name: bytes) -> str | None:
        """The first value of a header, by its lower-case name."""

    def headers(self, dropped: frozenset[str] = frozenset()) -> CIMultiDict[str]:
        """The headers less `dropped` (lower-case) and those its Connection header names."""

    async def chunk(self) -> bytes:
        """The next body bytes, b"" at the end; UpstreamFailure when the body cannot end."""

    async def read(self, limit: int) -> bytes | None:
        """The whole body, or None as soon as it passes `limit` bytes."""

    def pipe(self, sink: Callable[[bytes], bool] | None) -> None:
        """Hand body bytes to `sink` as they come (it returns False when it cannot take them:
        they are then kept for `chunk`); `chunk` still says when the body ends or fails."""

    def release(self) -> None:
        """Done with it: its connection may be kept when the body was read to its end."""

    def close(self) -> None:
        """Abandon it: its connection is closed, whatever is left unread."""


class Upstream(Protocol):
    async def send(
        self, request: UpstreamRequest, timeouts: UpstreamTimeouts
    ) -> UpstreamResponse: ...
