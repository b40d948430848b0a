"""The lean front: the gateway's listening side, an asyncio protocol on llhttp (`httptools`) that
serves plain proxied requests itself and hands every other connection to aiohttp's server.

A connection starts here. Each request's head is read whole and checked; one that is plain
(HTTP/1.1, GET or POST, a path the gateway does not own, a body of declared Content-Length
within limits.max_body_bytes, no Transfer-Encoding, Expect or Upgrade, a clean head: CRLF line
ends, no folded lines, one Content-Length, within limits.max_header_bytes) goes to the proxy
(datapath/proxy.serve) through this module's Downstream, and its answer is written here: a whole
reply in one write, a stream chunk by chunk. Anything else (a gateway path, jobs, the model list,
admin, anything unusual or hostile) hands the connection, bytes and all, to aiohttp's protocol,
which serves it and the rest of the connection as it always did (its checks, its errors). So
the lean path only ever sees requests whose every rule it applies, and the hardening rules stay
aiohttp's for all the others.

Requests on one connection are served in turn (pipelined ones wait in the buffer). A client that
leaves cancels its request's task, as aiohttp's `handler_cancellation` does. Idle connections,
and heads not complete, are closed after limits.client_keepalive_s; a body not received within
timeouts.client_body_s is a 408 and the connection closes. Past limits.max_connections (lean and
handed over together) a new connection gets the listener's 503 and is closed. On shutdown idle
connections close at once and requests under way get the drain time to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import logging
import socket
import time
from collections.abc import Iterable

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.app.listener import REFUSAL, limit_connections
from gateway.config import ApiKey, GatewayConfig, Limits
from gateway.datapath.auth import identify
from gateway.datapath.downstream import Buffered
from gateway.datapath.proxy import PROXY, serve
from gateway.datapath.relay import frame_chunk
from gateway.errors import (
    BodyTooLarge,
    ClientTimeout,
    GatewayError,
    error_body,
)
from gateway.logfilter import answer_in_json
from gateway.ops.metrics import METRICS
from gateway.pool.live import LIVE

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # buffered without a head's end before aiohttp is handed the bytes
HIGH_WATER = 64 * 1024  # client-side bytes unsent past which a write waits for the client
READ_AHEAD = 256 * 1024  # bytes of later requests buffered while one is served
LEAN_METHODS = frozenset({b"GET", b"POST"})
PATH, REQUEST = "path", "request"  # why a connection is handed over: a path the app owns, or not
_NO_BODY = frozenset({204, 304})
_SKIPPED = frozenset({"content-length", "transfer-encoding", "connection", "date"})


class _Date:
    """The Date header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def header(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.value = b"Date: %s\r\n" % email.utils.formatdate(now, usegmt=True).encode()
        return cls.value


def _head(status: int, reason: str | None, headers: Iterable[tuple[str, str]]) -> bytearray:
    """A response's status line and headers (no end), every value checked for CR and LF."""
    if not reason:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    out = bytearray(b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1", "replace")))
    for name, value in headers:
        if name.lower() in _SKIPPED:
            continue
        line = f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
        if line.count(b"\n") != 1 or line.count(b"\r") != 1:
            raise ValueError(f"header {name!r} holds a line break")
        out += line
    out += _Date.header()
    return out


class _Head:
    """httptools' callbacks for one request head."""

    __slots__ = ("done", "fields", "url")

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True


def _framing(fields: list[tuple[bytes, bytes]]) -> tuple[CIMultiDict[str], int, bool] | None:
    """The head's headers, its body's length and whether the client asked to close; None for a
    head the lean path leaves to aiohttp (Transfer-Encoding, Expect, Upgrade, another
    Connection option, a Content-Length twice or not a number)."""
    headers: CIMultiDict[str] = CIMultiDict()
    length, lengths, close = 0, 0, False
    for raw_name, raw_value in fields:
        name = raw_name.decode("utf-8", "surrogateescape")
        value = raw_value.decode("utf-8", "surrogateescape")
        lower = name.lower()
        if lower in ("transfer-encoding", "expect", "upgrade"):
            return None
        if lower == "content-length":
            lengths += 1
            if not value.isdigit() or lengths > 1:
                return None
            length = int(value)
        elif lower == "connection":
            tokens = {t.strip().lower() for t in value.split(",")}
            if not tokens <= {"keep-alive", "close"}:
                return None
            close = close or "close" in tokens
        headers.add(name, value)
    return headers, length, close


class Front:
    """The listening sockets' protocol factory for a gateway app, with the limits it started
    with. Made before the runner's setup (its shutdown hook joins the app's); `ready` after."""

    def __init__(self, app: web.Application, limits: Limits, drain_s: float) -> None:
        self.app = app
        self.keepalive_s = limits.client_keepalive_s
        self.max_connections = limits.max_connections
        self.drain_s = drain_s
        self.server: web.Server | None = None
        self.connections: set[_Connection] = set()
        self.owned: tuple[frozenset[str], tuple[str, ...]] = (frozenset(), ())
        metrics = app[METRICS]
        self.served = metrics.lean_requests
        self.handed = {why: metrics.handoffs.labels(why) for why in (PATH, REQUEST)}
        app.on_shutdown.append(self._drain)

    def ready(self, runner: web.AppRunner) -> None:
        """After the runner's setup: aiohttp's server (held to max_connections on its own too,
        for the sites it serves directly: the jobs socket of `workers: N`), and the paths the
        app owns (its routes but the catch-all) as exact paths and prefixes."""
        self.server = runner.server
        assert self.server is not None, "call after runner.setup()"
        answer_in_json(self.server)
        if self.max_connections is not None:
            limit_connections(runner, self.max_connections)
        exact, prefixes = set(), []
        for resource in self.app.router.resources():
            canonical = resource.canonical
            head = canonical.split("{", 1)[0]
            if head == "/":
                continue  # the catch-all: proxied
            if head == canonical:
                exact.add(canonical)
                prefixes.append(canonical + "/")
            else:
                prefixes.append(head)
        self.owned = (frozenset(exact), tuple(prefixes))

    def lean_path(self, path: str) -> bool:
        exact, prefixes = self.owned
        if path in exact or path.startswith(prefixes):
            return False
        # Anything that might spell a gateway path another way goes to aiohttp's checks.
        return not ("%" in path or "//" in path or "/." in path or "/admin" in path)

    def __call__(self) -> asyncio.Protocol:
        return _Connection(self)

    @property
    def open_connections(self) -> int:
        return len(self.connections) + (len(self.server.connections) if self.server else 0)

    async def _drain(self, app: web.Application) -> None:
        """Shutdown: idle connections close now; requests under way get drain_s to finish."""
        for conn in list(self.connections):
            conn.closing = True
            if conn.task is None:
                conn.close()
        serving = [c.task for c in self.connections if c.task is not None]
        if serving:
            await asyncio.wait(serving, timeout=self.drain_s)
        for conn in list(self.connections):
            conn.abort()


class _Connection(asyncio.Protocol):
    """One client connection while it is the lean front's."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.exchange: _Exchange | None = None
        self.closing = False
        self.paused = False
        self.drained: asyncio.Future[None] | None = None
        self.idle: asyncio.TimerHandle | None = None

    # -- the transport's side ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        front = self.front
        limit = front.max_connections
        if limit is not None and front.open_connections >= limit:
            transport.write(REFUSAL)  # type: ignore[attr-defined]
            transport.close()
            return
        front.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.closing = True
        if self.idle is not None:
            self.idle.cancel()
        if self.task is not None:
            self.task.cancel()  # the client left: its request ends (handler_cancellation)
        self._wake_writer()

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.wanted:
            data = exchange.take(data)
        if data:
            self.buffer += data
        if self.task is None:
            self._next()
        elif len(self.buffer) > READ_AHEAD and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    # -- requests ------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = self.loop.call_later(self.front.keepalive_s, self._idle_out)

    def _idle_out(self) -> None:
        if self.task is None:
            self.close()

    def _next(self) -> None:
        """Serve the next request in the buffer, once its head is whole."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES or (buffer and b"\n\n" in buffer):
                self._hand_off(REQUEST)
            return
        head = bytes(buffer[: end + 4])
        exchange = self._parse(head)
        if isinstance(exchange, str):
            self._hand_off(exchange)
            return
        del buffer[: end + 4]
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.exchange = exchange
        if exchange.wanted:
            rest = exchange.take(bytes(buffer))
            buffer.clear()
            buffer += rest
        self.front.served.inc()
        self.task = self.loop.create_task(self._serve(exchange))

    def _parse(self, head: bytes) -> _Exchange | str:
        """The request in `head` when the lean path may serve it; else why aiohttp gets it
        (PATH or REQUEST, gateway_front_handoffs' reasons)."""
        config = self.front.app[LIVE].runtime.config
        if len(head) > config.limits.max_header_bytes or head.count(b"\n") != head.count(b"\r\n"):
            return REQUEST
        if b"\r\n " in head or b"\r\n\t" in head or head.count(b"\r") != head.count(b"\r\n"):
            return REQUEST  # folded lines and bare CRs: aiohttp's rules
        fields = _Head()
        parser = httptools.HttpRequestParser(fields)
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return REQUEST  # malformed, or CONNECT and upgrades: aiohttp's answers
        if not fields.done or parser.get_http_version() != "1.1":
            return REQUEST
        method = parser.get_method()
        if method not in LEAN_METHODS:
            return REQUEST
        framed = _framing(fields.fields)
        if framed is None or framed[1] > config.limits.max_body_bytes:
            return REQUEST
        headers, length, close = framed
        path_qs = fields.url.decode("utf-8", "surrogateescape")
        if not path_qs.startswith("/") or not self.front.lean_path(path_qs.partition("?")[0]):
            return PATH
        return _Exchange(self, method.decode(), path_qs, CIMultiDictProxy(headers), length, close)

    def _hand_off(self, why: str) -> None:
        """aiohttp's protocol takes the connection and what it has sent so far (a request is
        never under way here, so reading is not paused)."""
        front, transport = self.front, self.transport
        if front.server is None or transport is None or transport.is_closing():
            self.abort()
            return
        front.connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        front.handed[why].inc()
        handler = front.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        if data:
            handler.data_received(data)

    async def _serve(self, exchange: _Exchange) -> None:
        try:
            await self._answer(exchange)
        except ConnectionError:
            pass  # the client left while its answer was written: nothing more to tell it
        finally:
            self.task = None
            self.exchange = None
            self._after(exchange)

    async def _answer(self, exchange: _Exchange) -> None:
        try:
            config = self.front.app[LIVE].runtime.config
            if config.auth is not None:
                exchange.key = key = identify(config.auth, exchange.headers.get("Authorization"))
                exchange.key_name = key.name
            await serve(self.front.app[PROXY], exchange)
        except GatewayError as exc:
            await exchange.refuse(exc.status, exc.error_type, str(exc), exc.headers, exc.code)
        except ConnectionError:
            raise  # the client left: _serve ends quietly
        except Exception:
            log.exception("unhandled error on %s %s", exchange.method, exchange.path)
            await exchange.refuse(500, "internal_error", "the gateway failed; see its log")

    def _after(self, exchange: _Exchange) -> None:
        """The response is out: the next request, or the connection's end."""
        if not exchange.finished or exchange.wanted or exchange.close or self.closing:
            self.close()  # a cut response, a body not read whole, or the client asked
            return
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self._arm_idle()
        if self.buffer:
            self._next()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)
        if transport.get_write_buffer_size() > HIGH_WATER and self.drained is not None:
            await self.drained
            if transport.is_closing():
                raise ConnectionResetError("the client closed the connection")


class _Exchange:
    """One request on the lean path: datapath/downstream.Downstream."""

    scheme = "http"

    def __init__(
        self,
        conn: _Connection,
        method: str,
        path_qs: str,
        headers: CIMultiDictProxy[str],
        length: int,
        close: bool,
    ) -> None:
        self.conn = conn
        self.method = method
        self.path_qs = path_qs
        self.headers = headers
        self.host: str | None = headers.get("Host")
        self.key: ApiKey | None = None
        self.key_name = ""
        self.close = close
        self.wanted = length  # body bytes still to come
        self.chunks: list[bytes] = []
        self.arrived: asyncio.Future[None] | None = None
        self.started = False  # the status line is out
        self.chunked = False
        self.bodyless = False
        self.finished = False  # the whole response is out

    @property
    def remote(self) -> str | None:
        transport = self.conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if peer else None

    @property
    def path(self) -> str:
        return URL.build(path=self.path_qs.partition("?")[0], encoded=True).path

    # -- the body --------------------------------------------------------------------------

    def take(self, data: bytes) -> bytes:
        """Body bytes out of `data`; returns what follows the body (the next request)."""
        part, rest = data[: self.wanted], data[self.wanted :]
        self.chunks.append(part)
        self.wanted -= len(part)
        if not self.wanted and self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)
        return rest

    async def body(self, limit: int, timeout_s: float) -> bytes:
        if self.wanted + sum(map(len, self.chunks)) > limit:  # limits.max_body_bytes reloaded
            raise BodyTooLarge(f"request body over limits.max_body_bytes = {limit} bytes")
        if self.wanted:
            self.arrived = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self.arrived
            except TimeoutError:
                raise ClientTimeout(
                    f"request body not received within timeouts.client_body_s = {timeout_s} s"
                ) from None
        return b"".join(self.chunks)

    # -- the answer ------------------------------------------------------------------------

    def _end_head(self, head: bytearray) -> bytearray:
        if self.close or self.conn.closing or self.wanted:  # a body not read: no next request
            self.close = True
            head += b"Connection: close\r\n"
        head += b"\r\n"
        return head

    async def reply(self, answer: Buffered) -> None:
        head = _head(answer.status, answer.reason, answer.headers.items())
        head += b"Content-Length: %d\r\n" % len(answer.body)
        self.started = True
        await self.conn.write(bytes(self._end_head(head)) + answer.body)
        self.finished = True

    async def refuse(
        self,
        status: int,
        error_type: str,
        message: str,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        """A JSON error, as checks.refusal answers on aiohttp's side; a response already
        started is cut instead."""
        if self.started:
            self.conn.abort()
            return
        body = json.dumps(error_body(error_type, message, code)).encode()
        fields: CIMultiDict[str] = CIMultiDict(headers or {})
        fields["Content-Type"] = "application/json; charset=utf-8"
        with contextlib.suppress(ConnectionError):
            await self.reply(Buffered(status, None, fields, body))

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> bool:
        head = _head(status, reason, headers.items())
        length = headers.get("Content-Length")
        self.bodyless = status in _NO_BODY or 100 <= status < 200
        if length is not None and length.isdigit() and not self.bodyless:
            head += b"Content-Length: %s\r\n" % length.encode()
        elif not self.bodyless:
            self.chunked = True
            head += b"Transfer-Encoding: chunked\r\n"
        self.started = True
        await self.conn.write(bytes(self._end_head(head)))
        return self.chunked

    async def write(self, chunk: bytes) -> None:
        if chunk and not self.bodyless:
            await self.conn.write(frame_chunk(chunk) if self.chunked else chunk)

    async def end(self) -> None:
        if self.chunked:
            await self.conn.write(b"0\r\n\r\n")
        self.finished = True

    def piped(self) -> asyncio.Transport | None:
        return self.conn.transport

    def abort(self) -> None:
        self.conn.abort()


class FrontSite(web.BaseSite):
    """A listening socket (or host and port) served by the lean front."""

    def __init__(
        self,
        runner: web.AppRunner,
        front: Front,
        *,
        sock: socket.socket | None = None,
        host: str | None = None,
        port: int = 0,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._front = front
        self._sock = sock
        self._host, self._port = host, port

    @property
    def name(self) -> str:
        sockets = getattr(self._server, "sockets", None)
        if sockets:
            host, port = sockets[0].getsockname()[:2]
            return f"http://{host}:{port}"
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(
                self._front,
                sock=self._sock,
                backlog=self._backlog,
            )
        else:
            self._server = await loop.create_server(
                self._front, self._host, self._port, backlog=self._backlog, reuse_address=True
            )


def gateway_runner(
    app: web.Application, config: GatewayConfig, shutdown_s: float
) -> tuple[web.AppRunner, Front]:
    """The runner of a gateway app and its lean front: aiohttp's server for what is handed
    to it, with the config's limits (call `front.ready(runner)` after `runner.setup()`)."""
    limits = config.limits
    front = Front(app, limits, shutdown_s)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_s,
        keepalive_timeout=limits.client_keepalive_s,
        max_line_size=limits.max_header_bytes,
        max_field_size=limits.max_header_bytes,
    )
    return runner, front
