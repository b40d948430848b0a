"""KV cache events on the wire, as vLLM publishes them, so a router reads this replica as it reads
vLLM.

Data path: `BlockManager` (replica/kv.py) reports what its prefix cache did; the continuous
batcher hands each step's events to `KvEventPublisher.publish` as one batch; a background
thread sends the batch on a ZeroMQ PUB socket and keeps it for replay.

The wire (vLLM's `ZmqEventPublisher`):
- PUB message `[topic, seq, payload]`: `seq` 8 bytes big-endian, 0 for this process's first
  batch and +1 per batch; `payload` msgpack `[ts, events, dp_rank]`, `dp_rank` always 0.
- Events, form "map" (vLLM today): `{"type": "BlockStored", "block_hashes", "parent_block_hash",
  "token_ids", "block_size", "lora_id", "medium", "lora_name", "group_idx",
  "kv_cache_spec_kind"}`, `{"type": "BlockRemoved", "block_hashes", "medium"}`,
  `{"type": "AllBlocksCleared"}`. Form "array" (older vLLM): the same fields positionally, the
  tag first. Block hashes are the replica's own chained u64 hashes (replica/kv.py), or with
  `hashes: vllm` 32 bytes each, as vLLM's default sha256 hashes are: see VllmHashes.
- Replay: a ROUTER at `replay_endpoint`. A DEALER sends `[b"", start_seq]` (8 bytes big-endian)
  and gets `[b"", seq, payload]` for each kept batch with `seq >= start_seq` (the last
  `buffer_steps` batches, payloads as published), then the end marker `[b"", ff * 8, b""]`.
- Sockets bind as vLLM's do ("bind stable, connect volatile"): the PUB binds when its endpoint
  has `*` or `::` or is ipc/inproc, and connects otherwise; ours also binds a tcp port 0 (a
  free port, reported in `endpoint_bound`), and any endpoint with `bind: true` (a loopback
  address, say: events carry prompts' token ids). The replay ROUTER always binds.

`publish` never blocks the event loop: it puts the batch on a bounded queue (`max_queue_size`)
without waiting. When the queue is full the batch is DROPPED, counted in `dropped`, with one
warning; its seq is still used up, so consumers see a gap and know they missed events (vLLM
blocks the caller instead). All ZeroMQ work happens in the one background thread, the only user
of the sockets; `close` stops it and closes them with linger 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgpack  # type: ignore[import-untyped]
import zmq

from replica.config import KvEventsConfig
from replica.kv import BlocksRemoved, BlocksStored, CacheCleared, CacheEvent

log = logging.getLogger("replica.kv_events")

MEDIUM = "GPU"
SPEC_KIND = "full_attention"
DP_RANK = 0
END_SEQ = b"\xff" * 8
Form = Literal["map", "array"]

_Queued = tuple[int, float, tuple[CacheEvent, ...]]  # seq, ts, events
EngineHash = Callable[[int], int | bytes]  # the replica's own block hash -> the one sent


def own_hash(block: int) -> int:
    return block


class VllmHashes:
    """Block hashes as vLLM sends them by default: 32 bytes of sha256 from a random root drawn
    per process, so no router can reproduce them and a restart changes every one. Each is the
    sha256 of the root and the block's own chained hash (a function of its whole prefix), so a
    prefix keeps one hash for the life of the process, and parents and removals translate
    without a map to keep."""

    def __init__(self, root: bytes | None = None) -> None:
        self._root = os.urandom(32) if root is None else root

    def __call__(self, block: int) -> bytes:
        return hashlib.sha256(self._root + block.to_bytes(8, "little")).digest()


def encode_event(event: CacheEvent, form: Form, engine_hash: EngineHash = own_hash) -> Any:
    as_map = form == "map"
    match event:
        case BlocksStored():
            parent = None if event.parent is None else engine_hash(event.parent)
            fields: dict[str, Any] = {
                "block_hashes": [engine_hash(h) for h in event.hashes],
                "parent_block_hash": parent,
                "token_ids": event.token_ids,
                "block_size": event.block_size,
                "lora_id": None,
                "medium": MEDIUM,
                "lora_name": None,
                "extra_keys": None,  # omitted from maps as vLLM omits a default
                "group_idx": 0,
                "kv_cache_spec_kind": SPEC_KIND,
            }
            if as_map:
                del fields["extra_keys"]
            tag = "BlockStored"
        case BlocksRemoved():
            hashes = [engine_hash(h) for h in event.hashes]
            fields, tag = {"block_hashes": hashes, "medium": MEDIUM}, "BlockRemoved"
        case CacheCleared():
            fields, tag = {}, "AllBlocksCleared"
    return {"type": tag, **fields} if as_map else [tag, *fields.values()]


def encode_batch(
    ts: float, events: Sequence[CacheEvent], form: Form, engine_hash: EngineHash = own_hash
) -> bytes:
    encoded = [encode_event(e, form, engine_hash) for e in events]
    payload: bytes = msgpack.packb([ts, encoded, DP_RANK])
    return payload


def binds(endpoint: str) -> bool:
    local = endpoint.startswith(("ipc://", "inproc://"))
    any_port = endpoint.startswith("tcp://") and endpoint.rsplit(":", 1)[-1] == "0"
    return "*" in endpoint or "::" in endpoint or local or any_port


class KvEventPublisher:
    def __init__(self, config: KvEventsConfig) -> None:
        self._config = config
        self._hash: EngineHash = VllmHashes() if config.hashes == "vllm" else own_hash
        self._topic = config.topic.encode()
        self._queue: queue.Queue[_Queued] = queue.Queue(config.max_queue_size)
        self._seq = itertools.count()
        self._lock = threading.Lock()  # seqs enter the queue in order
        self._wake_r, self._wake_w = socket.socketpair()  # lets the thread sleep in one poll
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.endpoint_bound: str | None = None  # where the PUB bound (None: it connects)
        self.replay_bound: str | None = None
        self.dropped = 0

    def start(self, timeout_s: float = 10.0) -> None:
        """Open the sockets in the background thread; raises when they cannot be opened."""
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"kv_events: sockets not open after {timeout_s} s")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"kv_events: {self._error}") from self._error

    def publish(self, events: Sequence[CacheEvent]) -> bool:
        """Queue one batch for sending, never waiting; False when the queue was full (or the
        publisher is closed)."""
        if self._closed:
            return False
        with self._lock:
            seq = next(self._seq)
            try:
                self._queue.put_nowait((seq, time.time(), tuple(events)))
            except queue.Full:
                self._drop(seq)
                return False
        self._wake()
        return True

    def close(self) -> None:
        """Hand what is queued to the PUB socket, close the sockets with linger 0 (what is not
        on the wire yet is lost, as in vLLM) and end the thread."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._wake_r.close()
        self._wake_w.close()

    def _drop(self, seq: int) -> None:
        self.dropped += 1
        if self.dropped == 1:
            log.warning(
                "kv events: queue full (%d batches): dropping batches, from seq %d on; "
                "consumers will see gaps",
                self._config.max_queue_size,
                seq,
            )

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (wakes are pending anyway) or closed
            self._wake_w.send(b"\0")

    # -- the background thread ------------------------------------------------------------

    def _run(self) -> None:
        sockets: list[zmq.Socket[bytes]] = []
        try:
            try:
                pub = self._open_pub(sockets)
                replay = self._open_replay(sockets)
            except zmq.ZMQError as error:
                self._error = error
                return
            finally:
                self._ready.set()
            self._serve(pub, replay)
        except Exception:  # a bug: the replica goes on serving, without events
            log.exception("kv events: the publisher thread failed")
        finally:
            for sock in sockets:
                sock.close(linger=0)

    def _open_pub(self, sockets: list[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        endpoint = self._config.endpoint
        pub = _socket(zmq.PUB, endpoint, sockets)
        pub.setsockopt(zmq.SNDHWM, self._config.hwm)
        if self._config.bind or (self._config.bind is None and binds(endpoint)):
            pub.bind(endpoint)
            self.endpoint_bound = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            pub.connect(endpoint)
        return pub

    def _open_replay(self, sockets: list[zmq.Socket[bytes]]) -> zmq.Socket[bytes] | None:
        endpoint = self._config.replay_endpoint
        if endpoint is None:
            return None
        router = _socket(zmq.ROUTER, endpoint, sockets)
        router.setsockopt(zmq.SNDHWM, self._config.buffer_steps + 2)  # a whole replay fits
        router.bind(endpoint)
        self.replay_bound = router.getsockopt_string(zmq.LAST_ENDPOINT)
        return router

    def _serve(self, pub: zmq.Socket[bytes], replay: zmq.Socket[bytes] | None) -> None:
        kept: deque[tuple[int, bytes]] = deque(maxlen=self._config.buffer_steps)
        poller = zmq.Poller()
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        if replay is not None:
            poller.register(replay, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            self._drain_wakes()
            self._send_queued(pub, kept)  # first, so a replay holds all published before it
            if replay is not None and replay in ready:
                _answer_replays(replay, kept)
            if self._closing.is_set():
                return

    def _drain_wakes(self) -> None:
        with contextlib.suppress(OSError):  # until nothing is left to read
            while self._wake_r.recv(4096):
                pass

    def _send_queued(self, pub: zmq.Socket[bytes], kept: deque[tuple[int, bytes]]) -> None:
        while True:
            try:
                seq, ts, events = self._queue.get_nowait()
            except queue.Empty:
                return
            payload = encode_batch(ts, events, self._config.form, self._hash)
            seq_bytes = seq.to_bytes(8, "big")
            pub.send_multipart([self._topic, seq_bytes, payload])  # PUB drops at HWM
            kept.append((seq, payload))


def _socket(kind: int, endpoint: str, sockets: list[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(kind)
    sockets.append(sock)
    if "::" in endpoint or "[" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)
    return sock


def _answer_replays(router: zmq.Socket[bytes], kept: deque[tuple[int, bytes]]) -> None:
    while True:
        try:
            frames = router.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
            log.debug("kv events: ignored a replay request of %d frames", len(frames))
            continue
        client, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, payload in kept:
            if seq >= start:
                router.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
        router.send_multipart([client, b"", END_SEQ, b""])


def open_publisher(config: KvEventsConfig) -> KvEventPublisher | None:
    """A started publisher, or None when the config turns events off."""
    if not config.enabled:
        return None
    publisher = KvEventPublisher(config)
    publisher.start()
    return publisher
