"""A vLLM or SGLang engine's KV cache event publisher, byte for byte, on loopback: the
subscriber under test meets the same frames, payloads and replay protocol as from a real engine.

Written from the format description with msgpack and pyzmq alone (never from our decoder):
a message is `[topic, seq (8 bytes big-endian), payload]`, seq 0, 1, 2 ... per engine process;
the payload is the msgpack of `[ts, events, dp_rank]` (or `[ts, events]`, or a map), each event
a map tagged by "type" (current engines) or a positional array with the tag first (older ones),
trailing defaulted fields left out as msgspec's omit_defaults does. A ROUTER socket answers a
DEALER's `[b"", start_seq]` with every buffered `[b"", seq, payload]` from start_seq on, then the
end marker `[b"", ff*8, b""]`.

The publishing socket is an XPUB: on the wire it is a PUB, and it lets a test wait until the
subscriber is there (`wait_subscribed`) instead of losing the first messages to ZMQ's slow join.
Engine hashes are chained sha256 digests from a random root, as vLLM's are (32 bytes, or their
last 8 as an unsigned int): not our hashing, and not comparable between two publishers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections import deque
from typing import Any, Literal

import msgpack  # type: ignore[import-untyped]
import zmq
import zmq.asyncio

Hash = int | bytes
END_SEQ = (-1).to_bytes(8, "big", signed=True)
# Fields before the first with a default, in declaration order (vLLM after #42892; SGLang with
# medium, which it added later with a default of None).
_REQUIRED = {
    "vllm": {"BlockStored": 7, "BlockRemoved": 2, "AllBlocksCleared": 0},
    "sglang": {"BlockStored": 5, "BlockRemoved": 1, "AllBlocksCleared": 0},
}
_SGLANG_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
)


class FakePublisher:
    """Binds an XPUB at tcp://127.0.0.1:<port> (and a ROUTER for replay unless replay_port is
    None), publishes batches with seq 0, 1, 2 ... and keeps the last `buffer_steps` for replay."""

    def __init__(
        self,
        port: int = 0,
        replay_port: int | None = 0,
        *,
        topic: str = "",
        engine: Literal["vllm", "sglang"] = "vllm",
        form: Literal["map", "array"] = "map",
        hashes: Literal["int", "bytes"] = "int",
        dp_rank: int | None = 0,
        batch_form: Literal["array3", "array2", "map"] = "array3",
        buffer_steps: int = 10_000,
    ) -> None:
        self.port, self.replay_port = port, replay_port
        self.topic, self.engine, self.form, self.hashes = topic, engine, form, hashes
        self.dp_rank, self.batch_form = dp_rank, batch_form
        self.seq = 0  # the next batch's
        self.subscriptions: list[bytes] = []  # each SUB's subscribed topic prefix, as it came
        self.replay_requests: list[int] = []  # the start_seq of each replay request
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pending: list[Any] = []
        self._skip = 0
        self._root = os.urandom(32)
        self._context = zmq.asyncio.Context()
        self._sockets: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        # Every subscriber's subscription (not only the first of a topic); vLLM's default hwm.
        self._pub = self._socket(zmq.XPUB, {zmq.XPUB_VERBOSE: 1, zmq.SNDHWM: 100_000})

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.replay_port is None else f"tcp://127.0.0.1:{self.replay_port}"

    async def start(self) -> FakePublisher:
        try:
            self.port = _bind(self._pub, self.port)
            if self.replay_port is not None:
                router = self._socket(zmq.ROUTER, {})
                self.replay_port = _bind(router, self.replay_port)
                self._tasks.append(asyncio.create_task(self._serve_replay(router)))
        except BaseException:
            await self.close()
            raise
        self._tasks.append(asyncio.create_task(self._watch_subscriptions()))
        return self

    async def close(self) -> None:
        """Stops serving and closes every socket at once (linger 0); a second call does nothing."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for socket in self._sockets:
            socket.close(linger=0)
        self._context.term()

    async def __aenter__(self) -> FakePublisher:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_subscribed(self, count: int = 1, timeout_s: float = 5.0) -> None:
        """Until `count` subscriptions have reached the publisher (then it sends to them)."""
        async with asyncio.timeout(timeout_s):
            while len(self.subscriptions) < count:
                self._subscribed.clear()
                await self._subscribed.wait()

    # Events, pending until flush() sends them as one batch (one engine step).

    def stored(
        self,
        token_ids: list[int],
        block_size: int = 16,
        parent: Hash | None = None,
        medium: str | None = "GPU",
        lora_name: str | None = None,
        group_idx: int | None = 0,
        kind: str | None = "full_attention",
    ) -> list[Hash]:
        """A BlockStored of the full blocks of token_ids after `parent`; their engine hashes."""
        blocks = len(token_ids) // block_size
        if not blocks:
            return []  # an engine stores full blocks only
        tokens = token_ids[: blocks * block_size]
        made: list[Hash] = []
        previous = parent
        for start in range(0, len(tokens), block_size):
            previous = self._block_hash(previous, tokens[start : start + block_size])
            made.append(previous)
        fields = {
            "block_hashes": made,
            "parent_block_hash": parent,
            "token_ids": tokens,
            "block_size": block_size,
            "lora_id": None,
            "medium": medium,
            "lora_name": lora_name,
            "extra_keys": [None] * blocks,  # what vLLM sends for blocks without extra keys
            "group_idx": group_idx,
            "kv_cache_spec_kind": kind,
            "kv_cache_spec_sliding_window": None,
        }
        self._pending.append(self._event("BlockStored", fields))
        return made

    def removed(self, hashes: list[Hash], medium: str | None = "GPU") -> None:
        fields = {"block_hashes": hashes, "medium": medium, "group_idx": None}
        self._pending.append(self._event("BlockRemoved", fields))

    def cleared(self) -> None:
        self._pending.append(self._event("AllBlocksCleared", {}))

    async def flush(self) -> int | None:
        """Sends the pending events as one batch; its seq (None when nothing was pending)."""
        if not self._pending:
            return None
        events, self._pending = self._pending, []
        return await self.publish_batch(events)

    async def publish_batch(self, events: list[Any]) -> int:
        """Any events (hostile ones too) as one batch in this publisher's batch form."""
        return await self.publish_payload(msgpack.packb(self.batch(events), use_bin_type=True))

    async def publish_payload(self, payload: bytes) -> int:
        """Any payload under the next seq: sent live (unless skipped) and kept for replay."""
        seq, self.seq = self.seq, self.seq + 1
        if self._skip:
            self._skip -= 1
        else:
            await self._pub.send_multipart([self.topic.encode(), seq.to_bytes(8, "big"), payload])
        self._buffer.append((seq, payload))
        return seq

    async def raw(self, frames: list[bytes]) -> None:
        """Arbitrary frames on the publishing socket, outside the seq and the replay buffer."""
        await self._pub.send_multipart(frames)

    def restart(self) -> None:
        """As a restarted engine: seq from 0 again, nothing to replay, nothing pending."""
        self.seq, self._skip = 0, 0
        self._buffer.clear()
        self._pending.clear()

    def skip(self, n: int) -> None:
        """The next n batches go to the replay buffer only: a gap in the live stream."""
        self._skip += n

    def batch(self, events: list[Any]) -> Any:
        ts = time.time()
        if self.batch_form == "array2":
            return [ts, events]
        if self.batch_form == "array3":
            return [ts, events, self.dp_rank]
        rank = "attn_dp_rank" if self.engine == "sglang" else "data_parallel_rank"
        return {"ts": ts, "events": events} | _present({rank: self.dp_rank})

    def _event(self, tag: str, fields: dict[str, Any]) -> Any:
        """An event as this engine and form send it: fields in declaration order, a defaulted
        field left out when None (in an array only the trailing ones); SGLang lacks vLLM's later
        fields."""
        if self.engine == "sglang":
            fields = {name: fields[name] for name in fields if name in _SGLANG_FIELDS}
        names = list(fields)
        required = _REQUIRED[self.engine][tag]  # the fields without a default
        if self.form == "map":
            named = {name: fields[name] for name in names[:required]}
            return {"type": tag} | named | _present({n: fields[n] for n in names[required:]})
        values = [fields[name] for name in names]
        while len(values) > required and values[-1] is None:
            values.pop()
        return [tag, *values]

    def _block_hash(self, parent: Hash | None, tokens: list[int]) -> Hash:
        seed = self._root if parent is None else msgpack.packb(parent, use_bin_type=True)
        digest = hashlib.sha256(seed + msgpack.packb(tokens)).digest()
        return digest if self.hashes == "bytes" else int.from_bytes(digest[-8:], "big")

    def _socket(self, kind: int, options: dict[int, int]) -> zmq.asyncio.Socket:
        socket = self._context.socket(kind)
        self._sockets.append(socket)
        for option, value in options.items():
            socket.setsockopt(option, value)
        return socket

    async def _watch_subscriptions(self) -> None:
        while True:
            message = await self._pub.recv()
            if message[:1] == b"\x01":
                self.subscriptions.append(message[1:])
                self._subscribed.set()

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        """vLLM's replay: a request is [identity, b"", start_seq]; anything else is ignored."""
        while True:
            request = await router.recv_multipart()
            if len(request) != 3:
                continue
            identity, _, start = request
            start_seq = int.from_bytes(start, "big")
            self.replay_requests.append(start_seq)
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await router.send_multipart([identity, b"", seq.to_bytes(8, "big"), payload])
            await router.send_multipart([identity, b"", END_SEQ, b""])


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _bind(socket: zmq.asyncio.Socket, port: int) -> int:
    """Binds on loopback (port 0: any free one); the port bound."""
    socket.bind(f"tcp://127.0.0.1:{port or '*'}")
    endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    return int(endpoint.rsplit(b":", 1)[1])
