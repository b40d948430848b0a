"""The proxy: relays one client request to a replica, retrying on another one while no
response byte has reached the client, and streams the response back.

The request body is read whole (bounded by limits.max_body_bytes) so it has an exact length and
can be re-sent. Small responses of known length are relayed in one write; anything else chunk
by chunk as it arrives, so server-sent events reach the client when the replica emits them.
Each attempt is one admission lease, which decides where (and whether) it goes and records its
outcome when it ends. Every replica response's `X-Replica-Load` header is handed to the pool
(load feedback), and a streamed completion's estimated work shrinks as its tokens are relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from gateway.config import GatewayConfig, Retries, Timeouts
from gateway.datapath import h1client
from gateway.datapath.auth import key_name
from gateway.datapath.classify import classify
from gateway.datapath.sse import SseCounter
from gateway.datapath.upstream import RETRIABLE_STATUSES
from gateway.errors import (
    BodyTooLarge,
    ClientTimeout,
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamTimeout,
    error_body,
)
from gateway.pool.admission import CLIENT_CLOSED, Lease, NoUntriedReplica
from gateway.pool.live import Live
from gateway.pool.replicas import parse_load_report
from gateway.routing.replica import Replica

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Infergate-Replica"
REQUEST_ID_HEADER = "X-Request-Id"
LOAD_HEADER = "X-Replica-Load"
LOAD_HEADER_LOWER = LOAD_HEADER.lower().encode()
BUFFERED_MAX_BYTES = 256 * 1024  # also the most of a 429/503 body held for a retry
PIPE_HIGH_WATER = 64 * 1024  # client-side bytes unsent past which piping hands back to the task
# The longest Idempotency-Key replicas take (replica/idempotency.py MAX_KEY_CHARS; Stripe's too).
IDEMPOTENCY_KEY_MAX_CHARS = 255

# RFC 9110 section 7.6.1, plus the non-standard ones seen in the wild.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
# A whole body is relayed with its length recomputed by the server.
RESPONSE_DROPPED = HOP_BY_HOP | {"content-length"}
# Recomputed for the upstream leg: the body is re-sent whole, the client sets Host.
NOT_FORWARDED = frozenset({"host", "content-length", "expect"})
# Set from what the gateway saw (the request id is the client's own or a new one).
FORWARDING = frozenset({"x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})


class AttemptFailed(Exception):
    """An attempt failed before any response byte reached the client; `reason` is a
    `retries.retry_on` name, and `response` the replica's own answer when it sent one."""

    def __init__(
        self, reason: str, error: GatewayError, response: web.Response | None = None
    ) -> None:
        super().__init__(str(error))
        self.reason = reason
        self.error = error
        self.response = response

    @property
    def status(self) -> int:
        return self.response.status if self.response is not None else self.error.status


class RelayAborted(Exception):
    """The upstream failed after response bytes reached the client: the stream is cut."""

    def __init__(self, response: web.StreamResponse, reason: str) -> None:
        super().__init__(reason)
        self.response = response


class ClientGone(Exception):
    """The client closed its connection while the response was being relayed."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client closed the connection")
        self.response = response


def _dropped(headers: CIMultiDictProxy[str], extra: frozenset[str]) -> frozenset[str]:
    named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    return HOP_BY_HOP | extra | named


def upstream_request_headers(request: web.BaseRequest, request_id: str) -> list[tuple[str, str]]:
    headers = request.headers
    dropped = _dropped(headers, NOT_FORWARDED)
    owner = key_name(request)
    out = [
        (k, owned_idempotency_key(owner, v) if owner and lower == "idempotency-key" else v)
        for k, v in headers.items()
        if (lower := k.lower()) not in dropped and lower not in FORWARDING
    ]
    out.append((REQUEST_ID_HEADER, request_id))
    peer = request.remote or "unknown"
    prior = headers.get("X-Forwarded-For")
    out.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
    # What this gateway saw, never what the client claims (only X-Forwarded-For is a chain).
    out.append(("X-Forwarded-Proto", request.scheme))
    if request.host:
        out.append(("X-Forwarded-Host", request.host))
    return out


def owned_idempotency_key(owner: str, value: str) -> str:
    """With API keys, an Idempotency-Key is the client's within its key: two keys' "1" differ
    at the replica ('/' is in no key name). A valid value the prefix would push past what
    replicas take goes as its SHA-256 (the same value, the same key); one too long in itself
    goes as it is, for the replica to refuse as it would without keys."""
    key = f"{owner}/{value}"
    if len(key) <= IDEMPOTENCY_KEY_MAX_CHARS or len(value) > IDEMPOTENCY_KEY_MAX_CHARS:
        return key
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{owner}/{digest}"


def new_request_id() -> str:
    """128 random bits as hex, like a uuid4 without its cost (an id, not a secret)."""
    return f"{random.getrandbits(128):032x}"


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body over limits.max_body_bytes = {limit} bytes")


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    if not request.can_read_body:
        return b""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if length is not None and request.content.total_bytes >= length:
        # Already here with the headers: taken as it is, no timer and no read loop.
        return request.content.read_nowait(-1)
    try:
        async with asyncio.timeout(timeout_s):
            if length is not None:
                return await request.read()
            body = bytearray()
            async for chunk in request.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise _too_large(limit)
            return bytes(body)
    except TimeoutError:
        raise ClientTimeout(
            f"request body not received within timeouts.client_body_s = {timeout_s} s"
        ) from None
    except RequestPayloadError:  # its words may quote the client's bytes: not repeated
        raise InvalidRequest(
            "the request body's framing is broken (chunked encoding or length): "
            "send it again, whole"
        ) from None


class ProxyEvents:
    """What the proxy reports as it goes (gateway/ops/metrics.py counts it); no-ops here."""

    def unrouted(self, reason: str) -> None:
        """A request answered by the gateway without reaching a replica (`reason`: its type)."""

    def retried(self, reason: str) -> None:
        """A request sent again to another replica after `reason` (a retries.retry_on name)."""

    def retry_refused(self) -> None:
        """A retry not made: the retry budget was spent."""


@dataclass(eq=False)
class Proxy:
    """What the proxy holds across requests: the gateway in force, its upstream client (opened
    with the app), where it reports, and the retries in flight (for the retry budget)."""

    live: Live
    upstream: Callable[[], h1client.UpstreamPool]
    events: ProxyEvents = field(default_factory=ProxyEvents)
    retries_in_flight: int = 0

    def retry_allowed(self, retries: Retries) -> bool:
        """Envoy-style retry budget: retries in flight stay under a share of all requests."""
        share = retries.budget_percent / 100 * self.live.pool.outstanding
        return self.retries_in_flight < max(retries.min_retry_concurrency, share)


PROXY = web.AppKey("proxy", Proxy)
UPSTREAM = web.AppKey("upstream_pool", h1client.UpstreamPool)  # opened with the app


async def handle(request: web.Request) -> web.StreamResponse:
    """Every path that is not the gateway's own ends here."""
    if h1client.dot_segment(request.rel_url.raw_path_qs):  # before admission: it counts nowhere
        raise InvalidRequest(f"the request path {h1client.DOT_SEGMENT_PROBLEM}")
    proxy = request.app[PROXY]
    live = proxy.live
    config = live.runtime.config
    body = await read_body(request, config.limits.max_body_bytes, config.timeouts.client_body_s)
    request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
    try:
        # An alias is rewritten to the served model: in the body, or in a /v2/models/{name} path.
        asked = classify(live, request.rel_url.raw_path_qs, request.headers, body)
    except GatewayError as exc:  # an unknown model, or none of its replicas in rotation
        proxy.events.unrouted(exc.error_type)
        raise
    body, path_qs, info = asked.body, asked.path_qs, asked.info
    tried: list[Replica] = []
    failure: AttemptFailed | None = None
    for attempt in range(config.retries.max_attempts):
        if failure is not None and not proxy.retry_allowed(config.retries):
            proxy.events.retry_refused()
            break
        try:
            async with live.admission.lease(info, tried=tried) as lease:
                lease.key = key_name(request)
                tried.append(lease.replica)
                retry = attempt > 0
                sent = Outgoing(path_qs, body, request_id)
                return await _attempt(request, proxy, lease, sent, retry, config)
        except NoUntriedReplica:
            break
        except GatewayError as exc:  # from admission: nowhere to go now
            if failure is not None:
                break  # the first failure says more than "nowhere left to retry"
            proxy.events.unrouted(exc.error_type)
            raise
        except AttemptFailed as failed:
            failure = failed
            if failed.reason not in config.retries.retry_on:
                break
            if attempt + 1 < config.retries.max_attempts:
                proxy.events.retried(failed.reason)
    assert failure is not None
    if failure.response is not None:
        return failure.response  # the replica's own 429/503, Retry-After and all
    raise failure.error


@dataclass(frozen=True)
class Outgoing:
    """What goes to the replica: the path and query, the body, the request id."""

    path_qs: str
    body: bytes
    request_id: str


async def _attempt(
    request: web.Request,
    proxy: Proxy,
    lease: Lease,
    sent: Outgoing,
    retry: bool,
    config: GatewayConfig,
) -> web.StreamResponse:
    """One try on the leased replica; sets the lease's code to what the client got."""
    proxy.retries_in_flight += retry
    try:
        response = await _relay(request, lease, sent, config.timeouts)
        lease.code = response.status
        return response
    except AttemptFailed as failed:
        lease.code = failed.status
        raise
    except RelayAborted as exc:
        lease.code = 502
        await _cut(request, exc.response, str(exc))
        return exc.response
    except ClientGone as exc:
        lease.code = CLIENT_CLOSED
        return exc.response
    finally:
        proxy.retries_in_flight -= retry


async def _send(
    request: web.Request, replica: Replica, sent: Outgoing, timeouts: Timeouts
) -> h1client.Response:
    """The replica's response headers, or AttemptFailed naming why there are none."""
    try:
        return (
            await request.app[PROXY]
            .upstream()
            .request(
                replica.url,
                request.method,
                sent.path_qs,
                upstream_request_headers(request, sent.request_id),
                sent.body,
                connect_s=timeouts.connect_s,
                headers_s=min(timeouts.first_byte_s, timeouts.idle_s),
                idle_s=timeouts.idle_s,
                total_s=timeouts.total_s,
                keepalive_s=timeouts.upstream_keepalive_s,
            )
        )
    except h1client.UpstreamFailure as exc:
        raise AttemptFailed(exc.reason, _upstream_error(replica, exc)) from None


def _upstream_error(replica: Replica, failure: h1client.UpstreamFailure) -> GatewayError:
    reason, detail = failure.reason, failure.detail
    if reason == "timeout":
        return UpstreamTimeout(f"replica {replica.url} did not answer in time ({detail})")
    if reason == "connect_error":
        return UpstreamError(f"replica {replica.url} refused the connection: {detail}")
    if reason == "reset":
        return UpstreamError(f"replica {replica.url} closed the connection: {detail}")
    return UpstreamError(f"replica {replica.url} failed: {detail}")


def _take_load_report(live: Live, replica: Replica, header: str) -> None:
    report = parse_load_report(header)
    if "inflight" in report:  # the replica counts its requests without this one
        live.pool.report(replica, report, ours=replica.busy - 1)


async def _relay(
    request: web.Request, lease: Lease, sent: Outgoing, timeouts: Timeouts
) -> web.StreamResponse:
    replica, request_id = lease.replica, sent.request_id
    upstream = await _send(request, replica, sent, timeouts)
    response: web.StreamResponse
    try:
        report = upstream.header(LOAD_HEADER_LOWER)
        if report:
            _take_load_report(request.app[PROXY].live, replica, report)
        if upstream.status in RETRIABLE_STATUSES or _is_small_whole_body(request, upstream):
            response = await _buffered_response(upstream, replica, request_id)
            if upstream.status in RETRIABLE_STATUSES:
                error = UpstreamError(f"replica {replica.url} answered {upstream.status}")
                raise AttemptFailed(str(upstream.status), error, response)
        else:
            response = await _start_response(request, upstream, replica, request_id)
            await _copy_body(request, upstream, response, lease)
    except BaseException:
        upstream.close()  # never hand a half-read connection back to the pool
        raise
    upstream.release()
    return response


def _is_small_whole_body(request: web.Request, upstream: h1client.Response) -> bool:
    """A small body of known length is relayed in one write: it is not a stream, and one
    write instead of three (headers, body, end) is most of the proxy's cost per request."""
    length = upstream.content_length
    return length is not None and length <= BUFFERED_MAX_BYTES and request.method != "HEAD"


async def _buffered_response(
    upstream: h1client.Response, replica: Replica, request_id: str
) -> web.Response:
    headers = upstream.headers(RESPONSE_DROPPED)
    try:
        body = await upstream.read(BUFFERED_MAX_BYTES)
    except h1client.UpstreamFailure as exc:  # nothing was sent: a clean 502 (or 504)
        failure = h1client.UpstreamFailure(exc.reason, f"mid-body, {exc.detail}")
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
    headers[REPLICA_HEADER] = replica.url
    headers[REQUEST_ID_HEADER] = request_id
    return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)


async def _start_response(
    request: web.Request, upstream: h1client.Response, replica: Replica, request_id: str
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(upstream.headers(HOP_BY_HOP))
    response.headers[REPLICA_HEADER] = replica.url
    response.headers[REQUEST_ID_HEADER] = request_id
    try:
        await response.prepare(request)
    except ConnectionResetError:
        raise ClientGone(response) from None
    return response


async def _copy_body(
    request: web.Request, upstream: h1client.Response, response: web.StreamResponse, lease: Lease
) -> None:
    """Relay chunk by chunk: the first through aiohttp's writer (it sends the headers), then,
    for a chunked response, piped socket to socket while the client keeps up (see
    h1client.Response.pipe), and through the writer again, draining, when it does not. For a
    token stream, its work shrinks by the events relayed (never below 1 token until the response
    ends), and an error event from the replica (by the stream's framing, never its text: see
    SseCounter) marks the lease failed: the client got a 200, but the replica did not serve it."""
    replica = lease.replica
    events = SseCounter() if response.content_type == "text/event-stream" else None
    chunked = response.headers.get("Transfer-Encoding") == "chunked"
    transport = request.transport
    while True:
        try:
            chunk = await upstream.chunk()
        except h1client.UpstreamFailure as exc:
            # Bytes already reached the client: no status can be changed now, so cut the
            # stream rather than end it cleanly, and the client sees an incomplete response.
            reason = f"replica {replica.url} failed mid-response: {exc}"
            log.warning("%s", reason)
            raise RelayAborted(response, reason) from None
        if not chunk:
            break
        if events is not None:
            _count_events(lease, events, chunk)
        await _write(response, chunk)
        if chunked and transport is not None:
            # Headers are out: from here on chunks go straight from the replica's socket to
            # the client's while it keeps up, framed as aiohttp frames them.
            upstream.pipe(_pipe(lease, transport, events))
    await _write(response, b"", eof=True)


def _count_events(lease: Lease, events: SseCounter, chunk: bytes) -> None:
    done = min(events.feed(chunk), lease.remaining - 1)
    if done > 0:
        lease.progress(done)
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
        transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        return True

    return sink


async def _cut(request: web.Request, response: web.StreamResponse, reason: str) -> None:
    """End a relayed response that cannot complete: an SSE client gets an error event first;
    then the connection is aborted so no client mistakes the truncated body for a whole one."""
    if response.content_type == "text/event-stream":
        event = json.dumps(error_body("upstream_error", reason))
        with contextlib.suppress(ConnectionError):
            await response.write(f"event: error\ndata: {event}\n\n".encode())
    if request.transport is not None:
        request.transport.abort()


async def _write(response: web.StreamResponse, chunk: bytes, *, eof: bool = False) -> None:
    try:
        await (response.write_eof() if eof else response.write(chunk))
    except ConnectionResetError:
        raise ClientGone(response) from None
