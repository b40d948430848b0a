"""The relay: one attempt's exchange with the leased replica, streamed back to the client.

Small responses of known length are relayed in one write; anything else chunk by chunk as it
arrives (a chunked one piped socket to socket while the client keeps up), so server-sent events
reach the client when the replica emits them. Every response's `X-Replica-Load` header is
handed to the pool (load feedback), and a streamed completion's estimated work shrinks as its
tokens are relayed. A 429 or 503, or a failure before any byte reached the client, is an
AttemptFailed the proxy may retry; a failure after is a RelayAborted, and the client's stream is
cut (`cut`) so no client mistakes a truncated body for a whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from multidict import CIMultiDict

from gateway.config import Timeouts
from gateway.datapath.downstream import Buffered, Downstream
from gateway.datapath.headers import (
    HOP_BY_HOP,
    REPLICA_HEADER,
    REQUEST_ID_HEADER,
    RESPONSE_DROPPED,
    upstream_request_headers,
)
from gateway.datapath.sse import SseCounter
from gateway.datapath.trace import AttemptTrace, with_trace
from gateway.datapath.transport import (
    Upstream,
    UpstreamFailure,
    UpstreamRequest,
    UpstreamResponse,
    upstream_timeouts,
)
from gateway.datapath.upstream import RETRIABLE_STATUSES
from gateway.datapath.usage import usage_of_body
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout, error_body
from gateway.pool.lease import Lease
from gateway.pool.replicas import ReplicaPool, parse_load_report
from gateway.routing.replica import Replica

log = logging.getLogger(__name__)
T = TypeVar("T")

LOAD_HEADER = "X-Replica-Load"
LOAD_HEADER_LOWER = LOAD_HEADER.lower().encode()
BUFFERED_MAX_BYTES = 256 * 1024  # also the most of a 429/503 body held for a retry
PIPE_HIGH_WATER = 64 * 1024  # client-side bytes unsent past which piping hands back to the task


def frame_chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 7.1), as aiohttp's writer frames the ones it sends: the
    relay's only framing by hand, for bytes piped past the writer."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class AttemptFailed(Exception):
    """An attempt failed before any response byte reached the client; `reason` is a
    `retries.retry_on` name, and `response` the replica's own answer when it sent one."""

    def __init__(self, reason: str, error: GatewayError, response: Buffered | None = None) -> None:
        super().__init__(str(error))
        self.reason = reason
        self.error = error
        self.response = response

    @property
    def status(self) -> int:
        return self.response.status if self.response is not None else self.error.status


class RelayAborted(Exception):
    """The upstream failed after response bytes reached the client: the stream is cut
    (`event_stream`: the client is told why in an SSE error event first)."""

    def __init__(self, reason: str, event_stream: bool) -> None:
        super().__init__(reason)
        self.event_stream = event_stream


class ClientGone(Exception):
    """The client closed its connection while the response was being relayed."""

    def __init__(self) -> None:
        super().__init__("client closed the connection")


@dataclass(frozen=True)
class Outgoing:
    """What goes to the replica: the path and query, the body, the request id; what the
    gateway adds to the reply (its key's rate-limit headers, the class it ran in); and, when
    traced, the attempt's trace (its context goes to the replica)."""

    path_qs: str
    body: bytes
    request_id: str
    reply_headers: Mapping[str, str] = field(default_factory=dict)
    trace: AttemptTrace | None = None


async def _send(
    client: Downstream, replica: Replica, sent: Outgoing, upstream: Upstream, timeouts: Timeouts
) -> UpstreamResponse:
    """The replica's response headers, or AttemptFailed naming why there are none."""
    headers = upstream_request_headers(client, sent.request_id)
    if sent.trace is not None:
        headers = with_trace(headers, sent.trace.headers())
    asked = UpstreamRequest(replica.url, client.method, sent.path_qs, headers, sent.body)
    try:
        return await upstream.send(asked, upstream_timeouts(timeouts))
    except UpstreamFailure as exc:
        raise AttemptFailed(exc.reason, _upstream_error(replica, exc)) from None


def _upstream_error(replica: Replica, failure: UpstreamFailure) -> GatewayError:
    reason, detail = failure.reason, failure.detail
    if reason == "timeout":
        return UpstreamTimeout(f"replica {replica.url} did not answer in time ({detail})")
    if reason == "connect_error":
        return UpstreamError(f"replica {replica.url} refused the connection: {detail}")
    if reason == "reset":
        return UpstreamError(f"replica {replica.url} closed the connection: {detail}")
    return UpstreamError(f"replica {replica.url} failed: {detail}")


def _take_load_report(pool: ReplicaPool, replica: Replica, header: str) -> None:
    report = parse_load_report(header)
    if "inflight" in report:  # the replica counts its requests without this one
        pool.report(replica, report, ours=replica.busy - 1)


async def relay(
    client: Downstream,
    lease: Lease,
    sent: Outgoing,
    upstream_client: Upstream,
    timeouts: Timeouts,
    pool: ReplicaPool,
) -> int:
    """The leased replica's answer to `sent`, relayed to the client (its status returned):
    AttemptFailed while none of it reached the client (a retry may follow), RelayAborted or
    ClientGone after."""
    replica = lease.replica
    upstream = await _send(client, replica, sent, upstream_client, timeouts)
    try:
        report = upstream.header(LOAD_HEADER_LOWER)
        if report:
            _take_load_report(pool, replica, report)
        if upstream.status in RETRIABLE_STATUSES or _is_small_whole_body(client, upstream):
            answer = await _buffered_response(upstream, lease, sent)
            if upstream.status in RETRIABLE_STATUSES:
                error = UpstreamError(f"replica {replica.url} answered {upstream.status}")
                raise AttemptFailed(str(upstream.status), error, answer)
            await _to_client(client.reply(answer))
        else:
            headers = _response_headers(upstream, replica, sent, HOP_BY_HOP)
            event_stream = _is_event_stream(headers.get("Content-Type", ""))
            chunked = await _to_client(client.start(upstream.status, upstream.reason, headers))
            await _copy_body(client, upstream, chunked, event_stream, lease, sent.trace)
    except BaseException:
        upstream.close()  # never hand a half-read connection back to the pool
        raise
    upstream.release()
    return upstream.status


def _is_small_whole_body(client: Downstream, upstream: UpstreamResponse) -> bool:
    """A small body of known length is relayed in one write: it is not a stream, and one
    write instead of three (headers, body, end) is most of the proxy's cost per request."""
    length = upstream.content_length
    return length is not None and length <= BUFFERED_MAX_BYTES and client.method != "HEAD"


async def _buffered_response(upstream: UpstreamResponse, lease: Lease, sent: Outgoing) -> Buffered:
    replica = lease.replica
    headers = _response_headers(upstream, replica, sent, RESPONSE_DROPPED)
    try:
        body = await upstream.read(BUFFERED_MAX_BYTES)
    except UpstreamFailure as exc:  # nothing was sent: a clean 502 (or 504)
        failure = UpstreamFailure(exc.reason, f"mid-body, {exc.detail}")
        raise AttemptFailed(exc.reason, _upstream_error(replica, failure)) from None
    if body is None:  # only a 429/503 of unknown length gets here
        message = (
            f"replica {replica.url} answered {upstream.status} with a body of over "
            f"{BUFFERED_MAX_BYTES} bytes (dropped)"
        )
        body = json.dumps(error_body("upstream_error", message)).encode()
        headers.popall("Content-Type", None)
        headers.popall("Content-Encoding", None)
        headers["Content-Type"] = "application/json"
    elif lease.wants_usage and 200 <= upstream.status < 300:
        lease.usage = usage_of_body(body)
    return Buffered(upstream.status, upstream.reason, headers, body)


def _is_event_stream(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "text/event-stream"


def _response_headers(
    upstream: UpstreamResponse, replica: Replica, sent: Outgoing, dropped: frozenset[str]
) -> CIMultiDict[str]:
    """The replica's headers less `dropped`, and the gateway's own: the replica, the request
    id, what the request's tenancy adds."""
    headers = upstream.headers(dropped)
    headers[REPLICA_HEADER] = replica.url
    headers[REQUEST_ID_HEADER] = sent.request_id
    if sent.reply_headers:
        headers.update(sent.reply_headers)
    return headers


async def _copy_body(
    client: Downstream,
    upstream: UpstreamResponse,
    chunked: bool,
    event_stream: bool,
    lease: Lease,
    trace: AttemptTrace | None = None,
) -> None:
    """Relay chunk by chunk: the first through aiohttp's writer (it sends the headers), then,
    for a chunked response, piped socket to socket while the client keeps up (see
    UpstreamResponse.pipe), and through the writer again, draining, when it does not. For a
    token stream, its work shrinks by the events relayed (never below 1 token until the response
    ends), and an error event from the replica (by the stream's framing, never its text: see
    SseCounter) marks the lease failed: the client got a 200, but the replica did not serve it.
    A traced stream's first chunk is its time to first token."""
    replica = lease.replica
    events = SseCounter(lease.wants_usage) if event_stream else None
    first_chunk = trace.first_chunk if trace is not None and events is not None else None
    transport = client.piped() if chunked else None
    while True:
        try:
            chunk = await upstream.chunk()
        except UpstreamFailure as exc:
            # Bytes already reached the client: no status can be changed now, so cut the
            # stream rather than end it cleanly, and the client sees an incomplete response.
            reason = f"replica {replica.url} failed mid-response: {exc}"
            log.warning("%s", reason)
            raise RelayAborted(reason, event_stream) from None
        if not chunk:
            break
        if events is not None:
            _count_events(lease, events, chunk)
        await _write(client, chunk)
        if first_chunk is not None:
            first_chunk()
            first_chunk = None
        if transport is not None:
            # Headers are out: from here on chunks go straight from the replica's socket to
            # the client's while it keeps up, framed as the writer frames them.
            upstream.pipe(_pipe(lease, transport, events))
    await _write(client, b"", eof=True)


def _count_events(lease: Lease, events: SseCounter, chunk: bytes) -> None:
    count = events.feed(chunk)
    lease.streamed += count
    done = min(count, lease.remaining - 1)
    if done > 0:
        lease.progress(done)
    if events.usage is not None:
        lease.usage = events.usage
    if events.failed:
        lease.broken = True


def _pipe(
    lease: Lease, transport: asyncio.Transport, events: SseCounter | None
) -> Callable[[bytes], bool]:

    def sink(chunk: bytes) -> bool:
        if transport.is_closing() or transport.get_write_buffer_size() > PIPE_HIGH_WATER:
            return False  # relayed by the task, which waits for the client to drain
        if events is not None:
            _count_events(lease, events, chunk)
        transport.write(frame_chunk(chunk))
        return True

    return sink


async def cut(client: Downstream, aborted: RelayAborted) -> None:
    """End a relayed response that cannot complete: an SSE client gets an error event first;
    then the connection is aborted so no client mistakes the truncated body for a whole one."""
    if aborted.event_stream:
        event = json.dumps(error_body("upstream_error", str(aborted)))
        with contextlib.suppress(ConnectionError):
            await client.write(f"event: error\ndata: {event}\n\n".encode())
    client.abort()


async def _write(client: Downstream, chunk: bytes, *, eof: bool = False) -> None:
    await _to_client(client.end() if eof else client.write(chunk))


async def _to_client(sending: Awaitable[T]) -> T:
    """A write to the client; ClientGone when it has left."""
    try:
        return await sending
    except ConnectionResetError:
        raise ClientGone() from None
