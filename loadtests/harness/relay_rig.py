"""The two ends of the streaming relay benchmark, each run as its own process by
loadtests/frontends_bench.py: an upstream that streams server-sent events at a fixed rate, and a
client that holds C streams open and measures how late each event arrives.

    python -m loadtests.harness.relay_rig upstream --port P --events-per-s T --events N
    python -m loadtests.harness.relay_rig client --url URL --streams C --warmup-s W --seconds S \\
        --out F
    python -m loadtests.harness.relay_rig rate --url URL --rate R --seconds S --out F

The upstream is a raw asyncio protocol on uvloop, so it costs little per event. It answers
`GET /health` and any non-streaming request with a fixed completion. A POST whose JSON body has
`"stream": true` gets a chunked `text/event-stream` of N completion chunks, one every 1/T s, then
`data: [DONE]`. Streams are spread over the period, one tick per millisecond. Each event carries
`"t"`, its CLOCK_MONOTONIC send time in ns (one clock for every process on the machine). While a
stream's socket is not draining (the front end is not keeping up), its events are skipped, not
queued, so the offered rate adapts to what the front end relays.

The client runs C streams, each one request after another on a keep-alive connection. For every
event received inside the window it records receive time minus `"t"`; it writes the events
counted, the window and the delays' percentiles (from the raw samples) as JSON.

`rate` is an open-loop client for plain requests: request i is due at t0 + i/R and goes out on an
idle keep-alive connection (a new one when none is idle); its latency counts from when it was
due, so a stalled server cannot hide its queue.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import re
import time
from array import array
from pathlib import Path
from typing import Any

import httptools

from loadtests.analysis.stats import percentile

FIXED = (
    b'{"id":"cmpl-bench","object":"text_completion","created":0,"model":"m","choices":'
    b'[{"text":" a fixed completion from the relay benchmark.","index":0,"finish_reason":'
    b'"length","logprobs":null}],"usage":{"prompt_tokens":4,"completion_tokens":8,'
    b'"total_tokens":12}}'
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
STAMP = re.compile(rb'"t":(\d+)')


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _event(t_ns: int) -> bytes:
    data = (
        b'data: {"id":"cmpl-bench","object":"text_completion","model":"m","choices":[{"text":'
        b'" tok","index":0,"finish_reason":null}],"t":%d}\n\n' % t_ns
    )
    return b"%x\r\n%s\r\n" % (len(data), data)


DONE = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


# -- upstream -------------------------------------------------------------------------------


class Streams:
    """Every open stream, by the millisecond of the period it is due in."""

    def __init__(self, events_per_s: float, events: int) -> None:
        self.period_ms = max(1, round(1000 / events_per_s))
        self.events = events
        self.slots: list[set[_Upstream]] = [set() for _ in range(self.period_ms)]
        self.skipped = 0

    async def tick(self) -> None:
        next_ms = now_ns() // 1_000_000
        while True:
            current = now_ns() // 1_000_000
            while next_ms <= current:
                for stream in list(self.slots[next_ms % self.period_ms]):
                    stream.emit(self)
                next_ms += 1
            await asyncio.sleep(0.001)


class _Upstream(asyncio.Protocol):
    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.sent = 0
        self.slot = -1
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot >= 0:
            self.streams.slots[self.slot].discard(self)
            self.slot = -1

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.answer(head.split(" ", 2)[0], body)

    def answer(self, method: str, body: bytes) -> None:
        assert self.transport is not None
        stream = False
        if method == "POST" and body:
            try:
                stream = bool(json.loads(body).get("stream"))
            except (ValueError, AttributeError):
                stream = False
        if not stream:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(FIXED), FIXED)
            )
            return
        self.transport.write(STREAM_HEAD)
        self.sent = 0
        self.slot = random.randrange(self.streams.period_ms)
        self.streams.slots[self.slot].add(self)

    def emit(self, streams: Streams) -> None:
        assert self.transport is not None
        if self.paused:
            streams.skipped += 1
        else:
            self.transport.write(_event(now_ns()))
        self.sent += 1
        if self.sent >= streams.events:
            self.transport.write(DONE)
            streams.slots[self.slot].discard(self)
            self.slot = -1


async def run_upstream(port: int, events_per_s: float, events: int) -> None:
    loop = asyncio.get_running_loop()
    streams = Streams(events_per_s, events)
    server = await loop.create_server(
        lambda: _Upstream(streams), "127.0.0.1", port, reuse_address=True, backlog=4096
    )
    async with server:
        await streams.tick()


# -- client ---------------------------------------------------------------------------------


class Window:
    def __init__(self, start_ns: int, end_ns: int) -> None:
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.events = 0
        self.delays = array("q")
        self.errors = 0
        self.streams_done = 0


class _Client(asyncio.Protocol):
    def __init__(self, window: Window, request: bytes, done: asyncio.Future[None]) -> None:
        self.window = window
        self.request = request
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.status_seen = False
        self.done_seen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.status_seen = False
        self.done_seen = False
        self.tail = b""
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        received = now_ns()
        window = self.window
        text = self.tail + data
        if not self.status_seen:
            if not text.startswith(b"HTTP/1.1 200") and len(text) >= 12:
                window.errors += 1
                assert self.transport is not None
                self.transport.close()
                return
            self.status_seen = True
        cut = text.rfind(b"\n\n") + 2  # events end in a blank line; the rest waits
        complete, self.tail = (text[:cut], text[cut:]) if cut >= 2 else (b"", text)
        if window.start_ns <= received < window.end_ns:
            for match in STAMP.finditer(complete):
                window.events += 1
                window.delays.append(received - int(match.group(1)))
        if b"[DONE]" in complete:
            self.done_seen = True
        if self.done_seen and text.endswith(b"0\r\n\r\n"):  # the last chunk
            window.streams_done += 1
            if received < window.end_ns:
                self.send()
            else:
                assert self.transport is not None
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run_client(
    url: str, streams: int, warmup_s: float, seconds: float, events: int
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    host, _, port = url.removeprefix("http://").partition(":")
    body = json.dumps(
        {"model": "m", "prompt": "Stream please", "max_tokens": events, "stream": True}
    ).encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (f"{host}:{port}".encode(), len(body), body)
    )
    start = now_ns() + int(warmup_s * 1e9)
    window = Window(start, start + int(seconds * 1e9))
    finished: list[asyncio.Future[None]] = []
    for i in range(streams):
        done = loop.create_future()
        finished.append(done)
        await loop.create_connection(
            functools.partial(_Client, window, request, done), host, int(port)
        )
        if i % 50 == 49:
            await asyncio.sleep(0)
    await asyncio.sleep(max(0.0, (window.end_ns - now_ns()) / 1e9))
    # Streams end on their own (they are not renewed past the window); a bounded wait for them.
    await asyncio.wait(finished, timeout=events * 0.1 + 10)
    delays = window.delays
    return {
        "events": window.events,
        "seconds": seconds,
        "events_per_s": window.events / seconds,
        "streams_done": window.streams_done,
        "errors": window.errors,
        "delay_p50_ms": percentile(delays, 50) / 1e6,
        "delay_p99_ms": percentile(delays, 99) / 1e6,
        "samples": len(delays),
    }


class _Caller(asyncio.Protocol):
    """One keep-alive connection of the fixed-rate client: a request at a time."""

    def __init__(self, idle: list[_Caller], latencies: array[int], errors: list[int]) -> None:
        self.idle = idle
        self.latencies = latencies
        self.errors = errors
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.due = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def call(self, request: bytes, due: int) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.errors[0] += 1
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() == 200:
            self.latencies.append(now_ns() - self.due)
        else:
            self.errors[0] += 1
        self.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)


async def run_rate(url: str, rate: float, seconds: float, path: str, body: bytes) -> dict[str, Any]:
    """Requests due at t0 + i/rate, each on an idle keep-alive connection (a new one when none
    is idle); latency counts from when a request was due, so a slow server cannot hide its
    queue (no coordinated omission)."""
    loop = asyncio.get_running_loop()
    host, _, port = url.removeprefix("http://").partition(":")
    request = (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s"
        % (path.encode(), f"{host}:{port}".encode(), len(body), body)
    )
    idle: list[_Caller] = []
    latencies: array[int] = array("q")
    errors = [0]
    opened = 0
    total = int(rate * seconds)
    start = now_ns() + 50_000_000
    for i in range(total):
        due = start + int(i * 1e9 / rate)
        wait = (due - now_ns()) / 1e9
        if wait > 0:
            await asyncio.sleep(wait)
        if idle:
            caller = idle.pop()  # the most recently used: few connections, kept warm
        else:
            opened += 1
            _, caller = await loop.create_connection(
                lambda: _Caller(idle, latencies, errors), host, int(port)
            )
        caller.call(request, due)
    deadline = now_ns() + 10_000_000_000
    while len(latencies) + errors[0] < total and now_ns() < deadline:
        await asyncio.sleep(0.01)
    return {
        "requests": total,
        "errors": total - len(latencies),  # failed or never answered
        "connections": opened,
        "p50_ms": percentile(latencies, 50) / 1e6,
        "p99_ms": percentile(latencies, 99) / 1e6,
    }


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role", required=True)
    up = roles.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--events-per-s", type=float, default=40)
    up.add_argument("--events", type=int, default=200)
    cl = roles.add_parser("client")
    cl.add_argument("--url", required=True)
    cl.add_argument("--streams", type=int, required=True)
    cl.add_argument("--warmup-s", type=float, default=3)
    cl.add_argument("--seconds", type=float, default=10)
    cl.add_argument("--events", type=int, default=200)
    cl.add_argument("--out", type=Path, required=True)
    ra = roles.add_parser("rate")
    ra.add_argument("--url", required=True)
    ra.add_argument("--rate", type=float, default=1000)
    ra.add_argument("--seconds", type=float, default=10)
    ra.add_argument("--path", default="/v1/completions")
    ra.add_argument("--body", default='{"model":"m","prompt":"Say hi","max_tokens":16}')
    ra.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.role == "rate":
        result = uvloop.run(
            run_rate(args.url, args.rate, args.seconds, args.path, args.body.encode())
        )
        args.out.write_text(json.dumps(result))
        return
    if args.role == "upstream":
        uvloop.run(run_upstream(args.port, args.events_per_s, args.events))
    else:
        result = uvloop.run(
            run_client(args.url, args.streams, args.warmup_s, args.seconds, args.events)
        )
        args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
