"""The fake engine publisher speaks vLLM's wire byte for byte, read with plain pyzmq sockets and
msgpack (not our decoder): the 3 frames with seq big-endian from 0, each engine's event forms,
the replay stream with its end marker, a restart's seq from 0 and a skipped seq that replay
fills."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import msgpack  # type: ignore[import-untyped]
import pytest
import zmq
import zmq.asyncio

from tests.support.vllm_events import FakePublisher

END = [b"", b"\xff" * 8, b""]
STORED_FIELDS = (
    "type",
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
)


@asynccontextmanager
async def subscribed(
    publisher: FakePublisher, topic: bytes = b""
) -> AsyncIterator[zmq.asyncio.Socket]:
    context = zmq.asyncio.Context()
    sub = context.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(publisher.endpoint)
        await publisher.wait_subscribed()
        yield sub
    finally:
        sub.close(linger=0)
        context.term()


@asynccontextmanager
async def dealer(publisher: FakePublisher) -> AsyncIterator[zmq.asyncio.Socket]:
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    try:
        assert publisher.replay_endpoint is not None
        socket.connect(publisher.replay_endpoint)
        yield socket
    finally:
        socket.close(linger=0)
        context.term()


async def receive(socket: zmq.asyncio.Socket) -> list[bytes]:
    frames = await asyncio.wait_for(socket.recv_multipart(), 5)
    return list(frames)


async def replay(publisher: FakePublisher, start_seq: int) -> list[list[bytes]]:
    """Every reply to one replay request, the end marker included."""
    async with dealer(publisher) as socket:
        await socket.send_multipart([b"", start_seq.to_bytes(8, "big")])
        replies = [await receive(socket)]
        while replies[-1] != END:
            replies.append(await receive(socket))
    return replies


def unpacked(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


async def test_a_batch_is_three_frames_with_seq_big_endian_from_zero() -> None:
    async with FakePublisher(topic="kv@r1") as publisher, subscribed(publisher) as sub:
        hashes = publisher.stored(list(range(40)))  # two full blocks of 16; 8 tokens left out
        assert await publisher.flush() == 0
        publisher.removed(hashes[:1])
        publisher.cleared()
        assert await publisher.flush() == 1
        assert publisher.stored(list(range(15))) == []  # no full block: no event
        assert await publisher.flush() is None  # nothing pending: no batch

        topic, seq, payload = await receive(sub)
        assert (topic, seq) == (b"kv@r1", b"\x00" * 8)
        ts, events, dp_rank = unpacked(payload)
        assert isinstance(ts, float) and dp_rank == 0
        assert [list(event) for event in events] == [list(STORED_FIELDS)]  # declared order
        assert events == [
            {
                "type": "BlockStored",
                "block_hashes": hashes,
                "parent_block_hash": None,
                "token_ids": list(range(32)),
                "block_size": 16,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
                "extra_keys": [None, None],
                "group_idx": 0,
                "kv_cache_spec_kind": "full_attention",
            }
        ]
        topic, seq, payload = await receive(sub)
        assert seq == (1).to_bytes(8, "big")
        assert unpacked(payload)[1] == [
            {"type": "BlockRemoved", "block_hashes": hashes[:1], "medium": "GPU"},
            {"type": "AllBlocksCleared"},
        ]


async def test_vllm_arrays_leave_out_trailing_defaults_only() -> None:
    async with FakePublisher(form="array", hashes="bytes") as publisher, subscribed(publisher) as s:
        hashes = publisher.stored([7] * 16, block_size=16, group_idx=None, kind=None)
        more = publisher.stored([8] * 16, parent=hashes[0], medium=None, lora_name="ad")
        publisher.removed(more, medium=None)
        publisher.cleared()
        await publisher.flush()
        _, _, payload = await receive(s)
        stored, chained, removed, cleared = unpacked(payload)[1]
    assert stored == ["BlockStored", hashes, None, [7] * 16, 16, None, "GPU", None, [None]]
    assert isinstance(hashes[0], bytes) and len(hashes[0]) == 32
    assert chained == [
        "BlockStored", more, hashes[0], [8] * 16, 16, None, None, "ad", [None], 0,
        "full_attention",
    ]  # fmt: skip
    assert removed == ["BlockRemoved", more, None]  # medium has no default: kept
    assert cleared == ["AllBlocksCleared"]


@pytest.mark.parametrize("form", ["map", "array"])
async def test_sglang_events_have_only_its_fields(form: Literal["map", "array"]) -> None:
    publisher = FakePublisher(engine="sglang", form=form, batch_form="map", dp_rank=2)
    async with publisher, subscribed(publisher) as sub:
        hashes = publisher.stored([1] * 16, lora_name="ignored", medium=None)
        publisher.removed(hashes, medium="CPU_TIER1")
        await publisher.flush()
        _, _, payload = await receive(sub)
    batch = unpacked(payload)
    assert list(batch) == ["ts", "events", "attn_dp_rank"] and batch["attn_dp_rank"] == 2
    stored = ["BlockStored", hashes, None, [1] * 16, 16, None]
    removed = ["BlockRemoved", hashes, "CPU_TIER1"]
    if form == "map":
        names = ["type", *STORED_FIELDS[1:6]]
        assert batch["events"] == [
            dict(zip(names, stored, strict=True)),
            {"type": "BlockRemoved", "block_hashes": hashes, "medium": "CPU_TIER1"},
        ]
    else:
        assert batch["events"] == [stored, removed]


@pytest.mark.parametrize(
    ("batch_form", "dp_rank", "shape"),
    [
        ("array3", 0, lambda ts, events: [ts, events, 0]),
        ("array3", None, lambda ts, events: [ts, events, None]),
        ("array2", 0, lambda ts, events: [ts, events]),
        ("map", 1, lambda ts, events: {"ts": ts, "events": events, "data_parallel_rank": 1}),
        ("map", None, lambda ts, events: {"ts": ts, "events": events}),
    ],
)
async def test_batch_forms(
    batch_form: Literal["array3", "array2", "map"], dp_rank: int | None, shape: Any
) -> None:
    publisher = FakePublisher(batch_form=batch_form, dp_rank=dp_rank)
    async with publisher, subscribed(publisher) as sub:
        await publisher.publish_batch([{"type": "AllBlocksCleared"}])
        _, _, payload = await receive(sub)
    batch = unpacked(payload)
    ts = batch["ts"] if isinstance(batch, dict) else batch[0]
    assert batch == shape(ts, [{"type": "AllBlocksCleared"}])


async def test_int_hashes_are_u64_chained_per_block_and_differ_between_engines() -> None:
    async with FakePublisher() as one, FakePublisher() as other:
        tokens = list(range(48))
        whole = one.stored(tokens)
        head = one.stored(tokens[:32])
        tail = one.stored(tokens[32:], parent=head[-1])
        assert whole == head + tail and len(set(whole)) == 3
        assert all(isinstance(h, int) and 0 <= h < 2**64 for h in whole)
        assert one.stored(tokens[16:32]) != whole[1:2]  # a block's hash depends on its prefix
        assert other.stored(tokens) != whole  # each engine's hashes start from its own root


async def test_replay_serves_the_published_bytes_from_start_seq_then_the_end_marker() -> None:
    async with FakePublisher() as publisher, subscribed(publisher) as sub:
        for n in range(3):
            publisher.stored([n] * 16)
            await publisher.flush()
        live = [await receive(sub) for _ in range(3)]
        replies = await replay(publisher, 1)
    assert replies == [[b"", seq, payload] for _, seq, payload in live[1:]] + [END]
    assert publisher.replay_requests == [1]


async def test_restart_starts_seq_at_zero_and_empties_the_replay_buffer() -> None:
    async with FakePublisher() as publisher, subscribed(publisher) as sub:
        await publisher.publish_batch([])
        await publisher.publish_batch([])
        publisher.stored([1] * 16)  # pending when the engine dies: never sent
        publisher.restart()
        await publisher.publish_batch([{"type": "AllBlocksCleared"}])
        seqs = [(await receive(sub))[1] for _ in range(3)]
        replies = await replay(publisher, 0)
    assert seqs == [(0).to_bytes(8, "big"), (1).to_bytes(8, "big"), (0).to_bytes(8, "big")]
    assert len(replies) == 2 and replies[0][1] == (0).to_bytes(8, "big")
    assert unpacked(replies[0][2])[1] == [{"type": "AllBlocksCleared"}]


async def test_a_skipped_seq_is_missing_live_and_filled_by_replay() -> None:
    async with FakePublisher() as publisher, subscribed(publisher) as sub:
        await publisher.publish_batch([])
        publisher.skip(1)
        await publisher.publish_batch([{"type": "AllBlocksCleared"}])
        await publisher.publish_batch([])
        live = [await receive(sub) for _ in range(2)]
        replies = await replay(publisher, 1)
    assert [seq for _, seq, _ in live] == [(0).to_bytes(8, "big"), (2).to_bytes(8, "big")]
    assert [seq for _, seq, _ in replies] == [(1).to_bytes(8, "big"), live[1][1], b"\xff" * 8]
    assert unpacked(replies[0][2])[1] == [{"type": "AllBlocksCleared"}]


async def test_the_replay_buffer_keeps_the_last_buffer_steps() -> None:
    async with FakePublisher(buffer_steps=2) as publisher:
        for _ in range(5):
            await publisher.publish_batch([])
        replies = await replay(publisher, 0)
    assert [seq for _, seq, _ in replies[:-1]] == [(3).to_bytes(8, "big"), (4).to_bytes(8, "big")]


async def test_raw_frames_and_payloads_go_out_as_given() -> None:
    async with FakePublisher(topic="t") as publisher, subscribed(publisher) as sub:
        await publisher.raw([b"one frame"])
        assert await publisher.publish_payload(b"\xc1 not msgpack") == 0
        assert await receive(sub) == [b"one frame"]
        assert await receive(sub) == [b"t", b"\x00" * 8, b"\xc1 not msgpack"]


async def test_topic_prefix_filters_and_each_subscriber_is_counted() -> None:
    async with FakePublisher(topic="kv@a", replay_port=None) as publisher:
        assert publisher.replay_endpoint is None
        async with subscribed(publisher, b"kv@b"), subscribed(publisher, b"kv@") as sub:
            await publisher.wait_subscribed(2)
            await publisher.publish_batch([])
            assert (await receive(sub))[0] == b"kv@a"
        assert publisher.subscriptions == [b"kv@b", b"kv@"]


async def test_close_leaves_no_task_and_frees_the_ports() -> None:
    publisher = await FakePublisher().start()
    ports = (publisher.port, publisher.replay_port)
    await publisher.close()
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    async with FakePublisher(*ports) as again:
        assert (again.port, again.replay_port) == ports


async def test_a_port_in_use_fails_start_and_leaves_nothing_open() -> None:
    async with FakePublisher() as publisher:
        taken = FakePublisher(replay_port=publisher.replay_port)
        with pytest.raises(zmq.ZMQError):
            await taken.start()
        await taken.close()  # again: nothing left to do
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
