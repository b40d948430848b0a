"""The proxy: relays one client request to the replica the policy picks, streaming the response.

The request body is read whole (bounded by limits.max_body_bytes) so it has an exact length and
can be re-sent; the response is relayed chunk by chunk as it arrives, so server-sent events
reach the client when the replica emits them. The outstanding count brackets the whole relay.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config import Timeouts
from gateway.errors import BodyTooLarge, NoHealthyReplica, UpstreamError, UpstreamTimeout
from gateway.pool import Replica
from gateway.runtime import STATE

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Infergate-Replica"
REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_CLOSED = 499  # nginx's status for "client closed request", recorded in metrics only
BUFFERED_MAX_BYTES = 256 * 1024

# RFC 9110 section 7.6.1, plus the non-standard ones seen in the wild.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
# Recomputed for the upstream leg: the body is re-sent whole, the client sets Host.
NOT_FORWARDED = frozenset({"host", "content-length", "expect"})


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


def upstream_request_headers(request: web.BaseRequest, request_id: str) -> CIMultiDict[str]:
    dropped = _dropped(request.headers, NOT_FORWARDED)
    out = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in dropped)
    out[REQUEST_ID_HEADER] = request_id
    peer = request.remote or "unknown"
    prior = request.headers.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out.setdefault("X-Forwarded-Proto", request.scheme)
    if request.host:
        out.setdefault("X-Forwarded-Host", request.host)
    return out


def client_response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    dropped = _dropped(upstream.headers, frozenset())
    return CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in dropped)


@functools.lru_cache(maxsize=16)
def _client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=timeouts.total_s, sock_connect=timeouts.connect_s, sock_read=timeouts.read_s
    )


def new_request_id() -> str:
    """128 random bits as hex, like a uuid4 without its cost (an id, not a secret)."""
    return f"{random.getrandbits(128):032x}"


async def read_body(request: web.Request, limit: int) -> bytes:
    too_large = BodyTooLarge(f"request body over limits.max_body_bytes = {limit} bytes")
    if request.content_length is not None:
        if request.content_length > limit:
            raise too_large
        return await request.read()
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def handle(request: web.Request) -> web.StreamResponse:
    """Every path that is not the gateway's own ends here."""
    state = request.app[STATE]
    runtime = state.runtime
    body = await read_body(request, runtime.config.limits.max_body_bytes)
    candidates = state.pool.available()
    if not candidates:
        state.metrics.unrouted.labels("no_healthy_replica").inc()
        raise NoHealthyReplica("no healthy replica to route to; see /admin/replicas")
    replica = runtime.policy.choose(candidates)
    request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
    started = time.perf_counter()
    code = CLIENT_CLOSED
    state.pool.acquire(replica)
    try:
        response = await _relay(request, replica, body, request_id, runtime.config.timeouts)
        code = response.status
        return response
    except UpstreamError as exc:
        code = exc.status
        raise
    except RelayAborted as exc:
        code = 502
        await _cut(request, exc.response, str(exc))
        return exc.response
    except ClientGone as exc:
        return exc.response
    finally:
        state.pool.release(replica, failed=code >= 500)
        state.metrics.observe(replica.url, code, time.perf_counter() - started)


async def _relay(
    request: web.Request, replica: Replica, body: bytes, request_id: str, timeouts: Timeouts
) -> web.StreamResponse:
    session = request.app[STATE].client()
    url = URL(replica.url + request.raw_path, encoded=True)
    headers = upstream_request_headers(request, request_id)
    try:
        async with session.request(
            request.method,
            url,
            data=body if body else None,
            headers=headers,
            timeout=_client_timeout(timeouts),
            allow_redirects=False,
        ) as upstream:
            if _is_small_whole_body(request, upstream):
                return await _buffered_response(upstream, replica, request_id)
            response = await _start_response(request, upstream, replica, request_id)
            await _copy_body(upstream, response, replica)
            return response
    except TimeoutError:
        raise UpstreamTimeout(f"replica {replica.url} did not answer in time") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"replica {replica.url} failed: {type(exc).__name__}") from None


def _is_small_whole_body(request: web.Request, upstream: aiohttp.ClientResponse) -> bool:
    """A small body of known length is relayed in one write: it is not a stream, and one
    write instead of three (headers, body, end) is most of the proxy's cost per request."""
    length = upstream.content_length
    return length is not None and length <= BUFFERED_MAX_BYTES and request.method != "HEAD"


async def _buffered_response(
    upstream: aiohttp.ClientResponse, replica: Replica, request_id: str
) -> web.Response:
    body = await upstream.read()  # a failure here has sent nothing: the caller answers 502
    headers = client_response_headers(upstream)
    headers.popall("Content-Length", None)
    headers[REPLICA_HEADER] = replica.url
    headers[REQUEST_ID_HEADER] = request_id
    return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)


async def _start_response(
    request: web.Request, upstream: aiohttp.ClientResponse, replica: Replica, request_id: str
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(client_response_headers(upstream))
    response.headers[REPLICA_HEADER] = replica.url
    response.headers[REQUEST_ID_HEADER] = request_id
    try:
        await response.prepare(request)
    except ConnectionResetError:
        raise ClientGone(response) from None
    return response


async def _copy_body(
    upstream: aiohttp.ClientResponse, response: web.StreamResponse, replica: Replica
) -> None:
    chunks = upstream.content.iter_any().__aiter__()
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Bytes already reached the client: no status can be changed now, so cut the
            # stream rather than end it cleanly, and the client sees an incomplete response.
            reason = f"replica {replica.url} failed mid-response: {type(exc).__name__}"
            log.warning("%s", reason)
            raise RelayAborted(response, reason) from None
        await _write(response, chunk)
    await _write(response, b"", eof=True)


async def _cut(request: web.Request, response: web.StreamResponse, reason: str) -> None:
    """End a relayed response that cannot complete: an SSE client gets an error event first;
    then the connection is aborted so no client mistakes the truncated body for a whole one."""
    if response.content_type == "text/event-stream":
        event = json.dumps({"error": {"type": "upstream_error", "message": reason}})
        with contextlib.suppress(ConnectionError):
            await response.write(f"event: error\ndata: {event}\n\n".encode())
    if request.transport is not None:
        request.transport.abort()


async def _write(response: web.StreamResponse, chunk: bytes, *, eof: bool = False) -> None:
    try:
        await (response.write_eof() if eof else response.write(chunk))
    except ConnectionResetError:
        raise ClientGone(response) from None
