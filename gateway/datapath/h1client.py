"""The proxy's upstream HTTP/1.1 client: keep-alive connections per replica origin, responses
parsed by llhttp (httptools, the parser uvicorn uses) and each request sent in one write.

aiohttp's client cost about half of the proxy's time per request (cProfile: 0.36 of 0.65 ms at
saturation): a request object, a response object, a stream reader, a timer context, cookie and
redirect handling the proxy turns off. This client keeps only what the proxy needs: the status,
the raw header list, the body chunk by chunk as it arrives (with back-pressure: the socket stops
being read while more than HIGH_WATER bytes wait for the client), and every failure named by
the `retries.retry_on` reason it stands for. Health checks, pollers and the jobs scheduler keep
aiohttp's client; they are not on the data path.

What a replica sends is held to what a client may send the gateway: a bounded response head
(MAX_HEAD_BYTES, MAX_HEADERS), a status code from 100 to 599, trailers kept out of the headers,
and a connection reused only when its response ended exactly where the next one may begin.
An idle connection is reused only within the caller's `keepalive_s`, and a request that meets
one the replica closed meanwhile goes once more on a new connection (see UpstreamPool.send).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httptools
from multidict import CIMultiDict
from yarl import URL

from gateway.datapath.transport import UpstreamFailure, UpstreamRequest, UpstreamTimeouts

HIGH_WATER = 256 * 1024  # body bytes buffered for the consumer before the socket is paused
LOW_WATER = 64 * 1024
SWEEP_S = 10.0  # the most an expired idle connection stays open (it is never reused)
# The response head: all bytes before the body (interim 1xx answers included), and the header
# count; Envoy's defaults are 60 KiB and 100. Past them the connection is closed, not read on.
# Trailers and chunk framing are held to the same byte cap between two body bytes.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
# Methods that carry no body unless they have one: no Content-Length: 0 for them.
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})


@dataclass(frozen=True)
class Origin:
    """Where a replica URL's connections go, and the prefix its paths sit under."""

    host: str
    port: int
    tls: bool
    host_header: str
    prefix: str


@functools.lru_cache(maxsize=1024)
def origin_of(replica_url: str) -> Origin:
    url = URL(replica_url)
    assert url.host is not None and url.port is not None, "validated by the config"
    return Origin(
        host=url.raw_host or url.host,
        port=url.port,
        tls=url.scheme == "https",
        host_header=url.raw_authority,
        prefix=url.raw_path.rstrip("/"),
    )


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class Response:
    """One upstream response: status and headers once they are in, then the body by chunk."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_last",
        "_reusable",
        "_sink",
        "_timer",
        "_waiter",
        "content_length",
        "done",
        "raw_headers",
        "reason",
        "status",
    )  # fmt: skip

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self.done = False  # the body ended (read by the connection; set only here)
        self._error: UpstreamFailure | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reusable = False
        self._timer: asyncio.TimerHandle | None = None
        self._sink: Callable[[bytes], bool] | None = None
        self._last = conn.loop.time()  # when body bytes last came (or the headers did)
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None

    def header(self, lower_name: bytes) -> str | None:
        """The first value of a header, by its lower-case name."""
        for name, value in self.raw_headers:
            if name.lower() == lower_name:
                return value.decode("latin-1")
        return None

    def headers(self, dropped: frozenset[str] = frozenset()) -> CIMultiDict[str]:
        """The headers as aiohttp holds them (UTF-8, bad bytes kept as surrogates), less the
        lower-case names in `dropped` and any the response's own Connection header names."""
        named = {
            token.strip().lower()
            for name, value in self.raw_headers
            if name.lower() == b"connection"
            for token in value.decode("latin-1").split(",")
        }
        out: CIMultiDict[str] = CIMultiDict()
        for raw_name, raw_value in self.raw_headers:
            name = raw_name.decode("utf-8", "surrogateescape")
            lower = name.lower()
            if lower not in dropped and lower not in named:
                out.add(name, raw_value.decode("utf-8", "surrogateescape"))
        return out

    async def chunk(self) -> bytes:
        """The next body bytes, b"" at the end; UpstreamFailure when the body cannot end."""
        while True:
            chunks = self._chunks
            if chunks:  # all that is here, in one piece: one write onward, not one per chunk
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self._conn.resume()
                return data
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            await self._wait_body()

    async def read(self, limit: int) -> bytes | None:
        """The whole body, or None as soon as it passes `limit` bytes (the rest is unread)."""
        if self.content_length is not None and self.content_length > limit:
            return None
        parts: list[bytes] = []
        size = 0
        while data := await self.chunk():
            size += len(data)
            if size > limit:
                return None
            parts.append(data)
        return b"".join(parts)

    def pipe(self, sink: Callable[[bytes], bool] | None) -> None:
        """Hand body bytes to `sink` as they are parsed, in the protocol callback, with no task
        switch and no copy into the queue: one call per read from the socket. `sink` returns
        False when it cannot take them now (its client is slow or gone); they are then queued
        for chunk(), and piping stops until it is asked for again. chunk() still says when the
        body ends or fails."""
        self._sink = sink

    def release(self) -> None:
        """Done with this response: its connection goes back to the pool when the body was
        read to its end and the replica keeps the connection alive, else it is closed."""
        conn = self._conn
        self._stop_timer()
        if self.done and self._error is None and self._reusable and not self._chunks:
            conn.park()
        else:
            conn.close()

    def close(self) -> None:
        """Abandon this response: its connection is closed, whatever was left unread."""
        self._stop_timer()
        self._conn.close()

    async def _wait_body(self) -> None:
        """Wait for body bytes. One idle timer per silence, not per chunk: it is set when a
        wait finds none running and, when it fires, moved to `idle_s` after the last bytes
        while any came since."""
        waiter = self._waiter = self._conn.loop.create_future()
        if self._timer is None:
            self._timer = self._conn.loop.call_at(self._idle_deadline(), self._idle_check)
        try:
            await waiter
        except TimeoutError:
            conn = self._conn
            if conn.deadline is not None and conn.loop.time() >= conn.deadline:
                detail = "the response did not end within timeouts.total_s"
            else:
                detail = f"no body bytes within {conn.idle_s:g} s"
            self._error = UpstreamFailure("timeout", detail)
            self._conn.close()
            raise self._error from None
        finally:
            self._waiter = None

    def _idle_deadline(self) -> float:
        conn = self._conn
        deadline = self._last + conn.idle_s
        return deadline if conn.deadline is None else min(deadline, conn.deadline)

    def _idle_check(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        deadline = self._idle_deadline()
        if self._conn.loop.time() >= deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self._conn.loop.call_at(deadline, self._idle_check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # What the connection tells the response; only these touch the body's buffer and state.

    def headers_in(self, reusable: bool, bodyless: bool) -> None:
        """The final response's head is in: wake the sender. `bodyless`: a HEAD's answer, done
        at once (llhttp would wait for the body its Content-Length announces)."""
        self._reusable = reusable and not bodyless
        self._last = self._conn.loop.time()
        self.done = bodyless
        self._wake()

    def feed(self, data: bytes) -> int:
        """Body bytes from the socket; returns how many are buffered unread."""
        if self.done:
            return 0
        self._chunks.append(data)
        self._buffered += len(data)
        self._last = self._conn.loop.time()
        if self._sink is None:
            self._wake()
        return self._buffered

    def flush(self) -> None:
        """After a read from the socket: what it brought goes to the pipe's sink, if one is set."""
        if self._sink is not None and self._chunks:
            self._flush()

    def finish(self) -> None:
        """The body ended (its framing said so, or the socket closed a body without one)."""
        self.done = True
        self._wake()

    def fail(self, error: UpstreamFailure) -> None:
        """The response cannot end whole (unless it already did)."""
        if self._error is None and not self.done:
            self._error = error
        self._wake()

    async def wait_headers(self, timeout_s: float) -> None:
        """Until the head is in (headers_in) or the response failed; a TimeoutError after
        `timeout_s`."""
        if self._error is not None:
            return
        loop = self._conn.loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    @property
    def error(self) -> UpstreamFailure | None:
        return self._error

    def _flush(self) -> None:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        assert self._sink is not None
        if not self._sink(data):
            self._sink = None
            chunks.append(data)
            self._buffered = len(data)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an origin; carries one request at a time."""

    def __init__(self, pool: UpstreamPool, key: Origin) -> None:
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.head_seen = False
        self.closed = False
        self.paused = False
        self.is_head = False
        self.until_close = False  # a body with neither length nor chunks ends when the socket does
        self.idle_since = 0.0
        self.idle_s = 300.0
        self.keepalive_s = 0.0
        self.deadline: float | None = None
        self.heard = False  # a byte came back since the request went out
        self.unframed = 0  # bytes read since the request, or since the last body bytes
        self.header_bytes = 0  # of the header names and values kept for this request

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (TCP/TLS)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.done:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        self.heard = True
        self.unframed += len(data)
        try:
            self.parser.feed_data(data)
            response.flush()
        except httptools.HttpParserUpgrade:
            self._abandon(UpstreamFailure("other", "the replica switched protocols (upgrade)"))
        except httptools.HttpParserError as exc:
            # A callback's own refusal (a cap, a status, a second response) says more.
            cause = exc.__context__
            failure = cause if isinstance(cause, UpstreamFailure) else None
            self._abandon(failure or UpstreamFailure("other", f"malformed response: {exc}"))
        else:
            if self.unframed > MAX_HEAD_BYTES:
                self._abandon(UpstreamFailure("other", self._over_cap()))

    def _abandon(self, failure: UpstreamFailure) -> None:
        """Fail the response (unless it already ended whole) and close the connection."""
        if self.response is not None:
            self.response.fail(failure)
        self.close()

    def _over_cap(self) -> str:
        if not self.head_seen:
            return f"response headers over {MAX_HEAD_BYTES} bytes"
        return f"over {MAX_HEAD_BYTES} bytes of chunk framing or trailers between body bytes"

    def eof_received(self) -> bool | None:
        self._ended()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()
        self.closed = True
        self.pool.forget(self)

    def _ended(self) -> None:
        response = self.response
        if response is None or response.done:
            return
        if self.head_seen and self.until_close:
            response.finish()
        else:
            when = "before the response headers" if not self.head_seen else "mid-body"
            response.fail(UpstreamFailure("reset", f"connection closed {when}"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response.done:
            # A second response after the one asked for, in the same read: it would be the
            # next request's answer on this connection. Parsing stops here; the connection
            # is closed.
            raise UpstreamFailure("other", "bytes after the end of the response")

    def on_status(self, status: bytes) -> None:
        assert self.response is not None
        self.response.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        if self.head_seen:
            return  # a trailer of a chunked body: not a header, and not relayed (as aiohttp)
        if len(response.raw_headers) >= MAX_HEADERS:
            raise UpstreamFailure("other", f"over {MAX_HEADERS} headers in the response")
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEAD_BYTES:  # exact, where a read holds head and body
            raise UpstreamFailure("other", f"response headers over {MAX_HEAD_BYTES} bytes")
        response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:  # llhttp takes any three digits
            raise UpstreamFailure("other", f"invalid status code {status:03d}")
        if 100 <= status < 200:  # an interim answer (103 Early Hints): wait for the final one
            response.raw_headers = []
            response.reason = ""
            return
        response.status = status
        length = chunked = None
        for name, value in response.raw_headers:
            lower = name.lower()
            if lower == b"content-length":
                length = value
            elif lower == b"transfer-encoding":
                chunked = value
        if length is not None and chunked is None:
            try:
                response.content_length = int(length)
            except ValueError:
                response.content_length = None
        no_body = self.is_head or status in (204, 304)
        self.until_close = length is None and chunked is None and not no_body
        self.head_seen = True
        reusable = self.parser.should_keep_alive() and not self.until_close
        response.headers_in(reusable, bodyless=self.is_head)

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        if response.done:
            return
        self.unframed = 0
        if response.feed(body) > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and self.head_seen:
            response.finish()

    # pool side

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def park(self) -> None:
        self.response = None
        self.head_seen = False
        self.deadline = None
        if self.closed or self.transport is None or self.transport.is_closing():
            self.close()
            return
        self.idle_since = self.loop.time()
        self.pool.park(self)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        self.closed = True
        self.pool.forget(self)


class UpstreamPool:
    """Idle keep-alive connections per origin, most recently used first; no cap on how many
    are open (the admission limits bound the requests in flight)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._idle: dict[Origin, list[_Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._open: set[_Connection] = set()
        self.connections_opened = 0
        self.stale_retries = 0  # requests sent again after meeting a connection closed idle

    async def send(self, request: UpstreamRequest, timeouts: UpstreamTimeouts) -> Response:
        """Send one request and return once the response headers are in (the Upstream
        contract: gateway/datapath/transport.py)."""
        key = origin_of(request.replica_url)
        body, keepalive_s = request.body, timeouts.keepalive_s
        message = _head(request.method, key, request.path_qs, request.headers, body) + body
        total_s = timeouts.total_s
        deadline = self.loop.time() + total_s if total_s is not None else None
        send = functools.partial(
            self._exchange,
            request.method,
            message,
            timeouts.headers_s,
            timeouts.idle_s,
            deadline,
            keepalive_s,
        )
        conn = self._take(key, keepalive_s)
        if conn is not None:
            try:
                return await send(conn)
            except UpstreamFailure as failure:
                if failure.reason != "reset" or conn.heard:
                    raise
                # The replica closed this idle connection as the request went out (its own
                # keep-alive timeout ran out first): nothing came back, so the request goes
                # once more, on a new connection, and the caller never sees the failure.
                self.stale_retries += 1
        return await send(await self._connect(key, timeouts.connect_s))

    async def _exchange(
        self,
        method: str,
        message: bytes,
        headers_s: float,
        idle_s: float,
        deadline: float | None,
        keepalive_s: float,
        conn: _Connection,
    ) -> Response:
        loop = self.loop
        conn.is_head = method == "HEAD"
        conn.idle_s = idle_s
        conn.keepalive_s = keepalive_s
        conn.deadline = deadline
        conn.heard = False
        conn.unframed = conn.header_bytes = 0
        response = conn.response = Response(conn)
        assert conn.transport is not None
        conn.transport.write(message)
        if not conn.head_seen:
            if deadline is not None:
                headers_s = min(headers_s, deadline - loop.time())
            try:
                await response.wait_headers(headers_s)
            except TimeoutError:
                conn.close()
                raise UpstreamFailure(
                    "timeout", f"no response headers within {headers_s:g} s"
                ) from None
            except BaseException:
                conn.close()
                raise
        if not conn.head_seen:  # woken by a failure, not by the headers
            error = response.error or UpstreamFailure("reset", "connection closed")
            conn.close()
            raise error
        return response

    def _take(self, key: Origin, keepalive_s: float) -> _Connection | None:
        idle = self._idle.get(key)
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            closing = conn.closed or conn.transport is None or conn.transport.is_closing()
            if closing or now - conn.idle_since > keepalive_s:
                conn.close()
                continue
            return conn
        return None

    async def _connect(self, key: Origin, connect_s: float) -> _Connection:
        try:
            async with asyncio.timeout(connect_s):
                _, protocol = await self.loop.create_connection(
                    lambda: _Connection(self, key),
                    key.host,
                    key.port,
                    ssl=_tls_context() if key.tls else None,
                    server_hostname=key.host if key.tls else None,
                )
        except TimeoutError:
            raise UpstreamFailure("timeout", f"not connected within {connect_s:g} s") from None
        except OSError as exc:
            raise UpstreamFailure("connect_error", str(exc) or type(exc).__name__) from None
        self.connections_opened += 1
        self._open.add(protocol)
        return protocol

    def park(self, conn: _Connection) -> None:
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(min(SWEEP_S, conn.keepalive_s), self._sweep)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _sweep(self) -> None:
        """Close idle connections past their keep-alive, so the replica need not."""
        self._sweeper = None
        now = self.loop.time()
        for key, idle in list(self._idle.items()):
            for conn in [c for c in idle if now - c.idle_since >= c.keepalive_s]:
                conn.close()
            if not self._idle.get(key):
                self._idle.pop(key, None)
        if self._idle:
            every = min(c.keepalive_s for idle in self._idle.values() for c in idle)
            self._sweeper = self.loop.call_later(min(SWEEP_S, every), self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.close()
        self._idle.clear()


_SEPARATORS = re.compile(r"/|\\|%2f|%5c", re.IGNORECASE)
_ENCODED_DOT = re.compile(r"%2e", re.IGNORECASE)
# What a refusal says of such a path, after its subject (the proxy's and the job store's).
DOT_SEGMENT_PROBLEM = (
    "holds a '.' or '..' segment (also as %2e, or behind %2f or a backslash), which could "
    "leave a replica URL's path prefix: send the path without them"
)


def dot_segment(path_qs: str) -> bool:
    """Whether the path (not the query) holds a `.` or `..` segment, spelt in any way a server
    or ingress in front of a replica may resolve: percent-encoded (%2e), behind an encoded
    slash or a backslash, or with `;` parameters. Joined under a replica URL's path prefix,
    it would climb out of it (`/tenant-a/../tenant-b/...`)."""
    path = path_qs.partition("?")[0]
    if "%" not in path and "/." not in path and "\\." not in path:
        return False  # no segment starts with a dot, nor can any be encoded
    return any(
        _ENCODED_DOT.sub(".", segment.partition(";")[0]) in (".", "..")
        for segment in _SEPARATORS.split(path)
    )


def _head(
    method: str, key: Origin, path_qs: str, headers: Sequence[tuple[str, str]], body: bytes
) -> bytes:
    # The target always starts a path, so nothing in it (`//host`, `@host`, `*`) can name
    # another host; the authority comes from the replica alone, and no dot segment climbs out
    # of its path prefix.
    path = path_qs if path_qs.startswith("/") else "/" + path_qs
    if any(c in path for c in " \r\n"):
        raise UpstreamFailure("other", "request target holds a space or line break")
    if dot_segment(path):
        raise UpstreamFailure("other", "request path holds a dot segment ('.' or '..')")
    lines = [f"{method} {key.prefix}{path} HTTP/1.1\r\nHost: {key.host_header}\r\n"]
    for name, value in headers:
        if "\r" in value or "\n" in value:
            continue  # aiohttp's server parser lets none through; never split a header here
        lines.append(f"{name}: {value}\r\n")
    if body or method not in BODYLESS:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")
