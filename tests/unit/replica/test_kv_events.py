"""KV cache events: what the block manager reports, and the publisher's wire as vLLM's, read
with plain msgpack and pyzmq on 127.0.0.1."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from replica.cli import apply_overrides, serve_parser
from replica.config import ConfigError, KvEventsConfig, parse_config
from replica.kv import (
    BlockManager,
    BlocksRemoved,
    BlocksStored,
    CacheCleared,
    CacheEvent,
    chain_hashes,
)
from replica.kv_events import KvEventPublisher, binds, open_publisher

END = b"\xff" * 8
LOCAL = "tcp://127.0.0.1:0"


def config(**fields: Any) -> KvEventsConfig:
    return KvEventsConfig.model_validate(
        {"enable_kv_cache_events": True, "endpoint": LOCAL} | fields
    )


class Client:
    """The consumer's sockets, plain pyzmq, all closed when the test ends."""

    def __init__(self) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []

    def socket(self, kind: int, endpoint: str | None = None) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.context.socket(kind)
        self.sockets.append(sock)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.setsockopt(zmq.LINGER, 0)
        if endpoint is not None:
            sock.connect(endpoint)
        return sock

    def sub(self, endpoint: str | None, topic: bytes = b"") -> zmq.Socket[bytes]:
        assert endpoint is not None
        sub = self.socket(zmq.SUB, endpoint)
        sub.subscribe(topic)
        return sub

    def replay(self, endpoint: str | None, start: int) -> list[tuple[int, bytes]]:
        """A DEALER's replay: [(seq, payload)] up to the end marker."""
        assert endpoint is not None
        dealer = self.socket(zmq.DEALER, endpoint)
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        got: list[tuple[int, bytes]] = []
        while True:
            empty, seq, payload = dealer.recv_multipart()
            assert empty == b""
            if seq == END:
                assert payload == b""
                return got
            got.append((int.from_bytes(seq, "big"), payload))

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.context.term()


@pytest.fixture
def client() -> Iterator[Client]:
    made = Client()
    yield made
    made.close()


@pytest.fixture
def publishers() -> Iterator[list[KvEventPublisher]]:
    made: list[KvEventPublisher] = []
    yield made
    for publisher in made:
        publisher.close()
    assert not [t for t in threading.enumerate() if t.name == "kv-events"]


def started(publishers: list[KvEventPublisher], cfg: KvEventsConfig) -> KvEventPublisher:
    publisher = KvEventPublisher(cfg)
    publishers.append(publisher)
    publisher.start()
    return publisher


def subscribe(publisher: KvEventPublisher, sub: zmq.Socket[bytes]) -> int:
    """Publish until the subscription is through (ZeroMQ drops what a PUB sends before a SUB's
    subscription reaches it); the seq of the batch that arrived."""
    for _ in range(100):
        publisher.publish([CacheCleared()])
        if sub.poll(50):
            return int.from_bytes(sub.recv_multipart()[1], "big")
    raise AssertionError("never subscribed")


def stored(hashes: list[int], parent: int | None, tokens: list[int], size: int) -> BlocksStored:
    return BlocksStored(tuple(hashes), parent, tuple(tokens), size)


# -- what the block manager reports ---------------------------------------------------------


def test_commit_reports_the_blocks_it_registers_with_their_parent_and_tokens() -> None:
    events: list[CacheEvent] = []
    blocks = BlockManager(16, 4, prefix_cache=True, sink=events.append)
    prompt = list(range(100, 111))  # 2 full blocks and 3 tokens
    chain = chain_hashes([*prompt, 7], 4)
    blocks.allocate(1, prompt)
    blocks.commit(1, prompt, 6)
    assert events == [stored(chain[:1], None, prompt[:4], 4)]
    blocks.commit(1, prompt, 11)
    assert events[1:] == [stored(chain[1:2], chain[0], prompt[4:8], 4)]
    blocks.grow(1, 12)
    blocks.commit(1, [*prompt, 7], 12)  # a decoded token fills the third block
    assert events[2:] == [stored(chain[2:3], chain[1], [*prompt[8:], 7], 4)]
    blocks.free(1)
    assert len(events) == 3  # freeing keeps blocks cached: nothing to report


def test_eviction_reports_the_removed_hash_and_no_sink_reports_nothing() -> None:
    events: list[CacheEvent] = []
    blocks = BlockManager(2, 4, prefix_cache=True, sink=events.append)
    first = list(range(8))
    blocks.allocate(1, first)
    blocks.commit(1, first, 8)
    blocks.free(1)
    events.clear()
    blocks.allocate(2, list(range(50, 54)))  # 1 block: the LRU one, the chain's tail, goes
    assert events == [BlocksRemoved((chain_hashes(first, 4)[1],))]
    assert blocks.cached_hashes() == [chain_hashes(first, 4)[0]]
    quiet = BlockManager(2, 4, prefix_cache=True)
    quiet.allocate(1, first)
    quiet.commit(1, first, 8)  # no sink: the same work, nothing to call
    assert quiet.cached_hashes() == chain_hashes(first, 4)


def test_a_hash_another_block_holds_is_not_reported_again_but_is_the_next_parent() -> None:
    events: list[CacheEvent] = []
    blocks = BlockManager(16, 4, prefix_cache=True, sink=events.append)
    shared = list(range(8))
    longer = [*shared, 20, 21, 22, 23, 24]
    chain = chain_hashes(longer, 4)
    blocks.allocate(1, shared)  # both miss the cache: computed side by side
    blocks.allocate(2, longer)
    blocks.commit(1, shared, 8)
    blocks.commit(2, longer, len(longer))
    assert events == [
        stored(chain[:2], None, shared, 4),
        stored(chain[2:], chain[1], longer[8:12], 4),  # chain[:2] were sequence 1's
    ]


def test_a_cached_block_in_the_middle_of_a_commit_splits_it_into_two_runs() -> None:
    events: list[CacheEvent] = []
    blocks = BlockManager(6, 2, prefix_cache=True, sink=events.append)
    tokens = [1, 2, 3, 4, 5, 6, 9]
    chain = chain_hashes(tokens, 2)
    blocks.allocate(1, tokens[:2])  # both miss: sequence 1 registers chain[0], 2 chain[1]
    blocks.allocate(2, tokens[:4])
    blocks.commit(1, tokens[:2], 2)
    blocks.commit(2, tokens[:4], 4)
    blocks.free(1)
    blocks.free(2)
    blocks.allocate(3, list(range(100, 110)))  # 5 blocks: 4 never cached, then LRU chain[0]
    blocks.free(3)
    assert blocks.cached_hashes() == [chain[1]]
    events.clear()
    blocks.allocate(4, tokens)  # chain[0] is gone, so no hit at all
    blocks.commit(4, tokens, 6)
    assert events == [
        stored(chain[:1], None, tokens[:2], 2),
        stored(chain[2:3], chain[1], tokens[4:6], 2),  # chain[1]: still another block's
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 14), st.integers(0, 14)),
        min_size=1,
        max_size=30,
    )
)
def test_events_replayed_give_the_cache_and_every_parent_was_stored_first(
    requests: list[tuple[int, int, int]],
) -> None:
    """Sequences from a few shared prefixes start, are committed part-way one request later
    (so two run side by side), freed or kept, and evict each other in a small pool: the
    events, applied in order, give exactly the cached hashes, and a stored block's parent was
    always reported stored before."""
    events: list[CacheEvent] = []
    blocks = BlockManager(8, 2, prefix_cache=True, sink=events.append)
    held: dict[int, tuple[list[int], int]] = {}
    for seq_id, (prefix, length, computed) in enumerate(requests):
        tokens = [prefix] * 4 + list(range(length))
        if blocks.allocate(seq_id, tokens) is None:
            for old in sorted(held):
                blocks.free(old)
            held.clear()
            continue
        held[seq_id] = tokens, min(len(tokens), 4 + computed)
        if seq_id - 1 in held:
            earlier, done = held[seq_id - 1]
            blocks.commit(seq_id - 1, earlier, done)
            if done % 2:
                blocks.free(seq_id - 1)
                del held[seq_id - 1]
    cached: set[int] = set()
    ever: set[int] = set()
    for event in events:
        if isinstance(event, BlocksStored):
            assert event.parent is None or event.parent in ever
            assert not cached & set(event.hashes)
            assert len(event.token_ids) == len(event.hashes) * event.block_size
            cached |= set(event.hashes)
            ever |= set(event.hashes)
        elif isinstance(event, BlocksRemoved):
            assert set(event.hashes) <= cached
            cached -= set(event.hashes)
    assert cached == set(blocks.cached_hashes())


# -- the publisher on the wire --------------------------------------------------------------


def test_pub_frames_are_topic_seq_and_a_msgpack_batch_in_map_form(
    client: Client, publishers: list[KvEventPublisher]
) -> None:
    publisher = started(publishers, config(topic="kv@r1"))
    assert publisher.endpoint_bound is not None
    assert re.fullmatch(r"tcp://127\.0\.0\.1:[1-9]\d*", publisher.endpoint_bound)
    sub = client.sub(publisher.endpoint_bound, b"kv@")
    seq = subscribe(publisher, sub)
    publisher.publish([stored([2**64 - 5, 7], 2**63 + 1, list(range(8)), 4)])
    publisher.publish([BlocksRemoved((7,)), CacheCleared()])
    topic, seq_bytes, payload = sub.recv_multipart()
    assert (topic, seq_bytes) == (b"kv@r1", (seq + 1).to_bytes(8, "big"))
    ts, events, dp_rank = msgpack.unpackb(payload)
    assert isinstance(ts, float) and dp_rank == 0
    assert events == [
        {
            "type": "BlockStored",
            "block_hashes": [2**64 - 5, 7],
            "parent_block_hash": 2**63 + 1,
            "token_ids": list(range(8)),
            "block_size": 4,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        }
    ]
    topic, seq_bytes, payload = sub.recv_multipart()
    assert int.from_bytes(seq_bytes, "big") == seq + 2
    assert msgpack.unpackb(payload)[1] == [
        {"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
    ]


def test_array_form_sends_the_older_positional_events(
    client: Client, publishers: list[KvEventPublisher]
) -> None:
    publisher = started(publishers, config(form="array", replay_endpoint=LOCAL))
    publisher.publish([stored([11, 12], None, [1, 2, 3, 4], 2), BlocksRemoved((11,))])
    publisher.publish([CacheCleared()])
    assert publisher.replay_bound is not None
    [(seq0, first), (seq1, second)] = client.replay(publisher.replay_bound, 0)
    assert (seq0, seq1) == (0, 1)
    _, events, dp_rank = msgpack.unpackb(first)
    assert events == [
        ["BlockStored", [11, 12], None, [1, 2, 3, 4], 2, None, "GPU", None, None, 0,
         "full_attention"],
        ["BlockRemoved", [11], "GPU"],
    ]  # fmt: skip
    assert msgpack.unpackb(second)[1] == [["AllBlocksCleared"]] and dp_rank == 0


def test_vllm_hashes_are_32_bytes_from_a_root_of_their_own_and_name_a_block_alike_everywhere(
    client: Client, publishers: list[KvEventPublisher]
) -> None:
    one, two = (started(publishers, config(hashes="vllm", replay_endpoint=LOCAL)) for _ in "12")
    for publisher in (one, two):
        publisher.publish(
            [stored([11, 12], None, [1, 2, 3, 4], 2), stored([13], 12, [5, 6], 2),
             BlocksRemoved((12,))]
        )  # fmt: skip
    [(_, first)] = client.replay(one.replay_bound, 0)
    [(_, second)] = client.replay(two.replay_bound, 0)
    head, tail, removed = msgpack.unpackb(first)[1]
    hashes = head["block_hashes"]
    assert [type(h) for h in hashes] == [bytes, bytes] and {len(h) for h in hashes} == {32}
    assert (head["parent_block_hash"], head["token_ids"]) == (None, [1, 2, 3, 4])
    assert tail["parent_block_hash"] == hashes[1] != tail["block_hashes"][0]
    assert removed["block_hashes"] == [hashes[1]]
    assert msgpack.unpackb(second)[1][0]["block_hashes"] != hashes  # another root


def test_replay_sends_kept_batches_from_the_asked_seq_then_the_end_marker(
    client: Client, publishers: list[KvEventPublisher]
) -> None:
    publisher = started(publishers, config(replay_endpoint=LOCAL, buffer_steps=3))
    assert publisher.replay_bound is not None
    sub = client.sub(publisher.endpoint_bound or "", b"")
    first = subscribe(publisher, sub)
    for i in range(4):
        publisher.publish([BlocksRemoved((i,))])
    live = {}
    for _ in range(4):
        _, seq, payload = sub.recv_multipart()
        live[int.from_bytes(seq, "big")] = payload
    last = first + 4
    got = client.replay(publisher.replay_bound, last - 1)
    assert got == [(last - 1, live[last - 1]), (last, live[last])]  # same bytes as published
    kept = client.replay(publisher.replay_bound, 0)
    assert [seq for seq, _ in kept] == [last - 2, last - 1, last]  # buffer_steps = 3
    assert client.replay(publisher.replay_bound, last + 1) == []


def test_a_malformed_replay_request_is_ignored_and_the_socket_keeps_answering(
    client: Client, publishers: list[KvEventPublisher]
) -> None:
    publisher = started(publishers, config(replay_endpoint=LOCAL))
    publisher.publish([CacheCleared()])
    assert publisher.replay_bound is not None
    dealer = client.socket(zmq.DEALER, publisher.replay_bound)
    dealer.send_multipart([b"", b"\x00\x01"])  # a 2-byte seq
    dealer.send_multipart([b"x", (0).to_bytes(8, "big"), b"more"])
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    assert dealer.recv_multipart()[1] == (0).to_bytes(8, "big")
    assert dealer.recv_multipart() == [b"", END, b""]
    assert not dealer.poll(200)  # the two bad requests got no answer


def test_a_full_queue_drops_the_batch_warns_once_and_leaves_a_seq_gap(
    client: Client, publishers: list[KvEventPublisher], caplog: pytest.LogCaptureFixture
) -> None:
    publisher = KvEventPublisher(config(replay_endpoint=LOCAL, max_queue_size=2))
    publishers.append(publisher)
    with caplog.at_level(logging.WARNING, logger="replica.kv_events"):
        results = [publisher.publish([BlocksRemoved((i,))]) for i in range(5)]  # not started
    assert results == [True, True, False, False, False]
    assert publisher.dropped == 3
    assert [r.getMessage() for r in caplog.records] == [
        "kv events: queue full (2 batches): dropping batches, from seq 2 on; "
        "consumers will see gaps"
    ]
    publisher.start()
    assert [seq for seq, _ in client.replay(publisher.replay_bound, 0)] == [0, 1]
    assert publisher.publish([CacheCleared()])  # the queue was sent before that answer
    got = client.replay(publisher.replay_bound, 0)
    assert [seq for seq, _ in got] == [0, 1, 5]
    assert msgpack.unpackb(got[1][1])[1] == [
        {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}
    ]


def test_an_endpoint_without_a_wildcard_is_connected_to_as_vllm_does(
    client: Client, publishers: list[KvEventPublisher]
) -> None:
    sub = client.socket(zmq.SUB)
    sub.bind("tcp://127.0.0.1:0")
    sub.subscribe(b"")
    publisher = started(publishers, config(endpoint=sub.getsockopt_string(zmq.LAST_ENDPOINT)))
    assert publisher.endpoint_bound is None
    subscribe(publisher, sub)


def test_bind_or_connect_rule() -> None:
    assert binds("tcp://*:5557") and binds("tcp://[::]:5557") and binds("ipc:///tmp/kv")
    assert binds("inproc://kv") and binds("tcp://127.0.0.1:0")
    assert not binds("tcp://127.0.0.1:5557") and not binds("tcp://router.local:5557")
    assert not binds("tcp://10.0.0.1:10")


def test_an_endpoint_in_use_fails_start_and_off_means_no_publisher(
    publishers: list[KvEventPublisher],
) -> None:
    first = started(publishers, config())
    assert first.endpoint_bound is not None
    second = KvEventPublisher(config(replay_endpoint=first.endpoint_bound))  # always binds
    publishers.append(second)
    with pytest.raises(RuntimeError, match="kv_events: Address already in use"):
        second.start()
    assert open_publisher(KvEventsConfig()) is None
    assert open_publisher(config(publisher="null")) is None


def test_close_ends_the_thread_and_frees_the_ports(publishers: list[KvEventPublisher]) -> None:
    publisher = started(publishers, config(replay_endpoint=LOCAL))
    for _ in range(50):
        publisher.publish([CacheCleared()])
    publisher.close()
    publisher.close()  # idempotent
    assert not publisher.publish([CacheCleared()])
    assert not [t for t in threading.enumerate() if t.name == "kv-events"]
    for port in (publisher.endpoint_bound, publisher.replay_bound):  # closed: they bind again
        assert started(publishers, config(replay_endpoint=port)).replay_bound == port


# -- configuration --------------------------------------------------------------------------


def test_kv_events_flag_takes_vllm_json_over_the_yaml_section() -> None:
    raw = {"kv_events": {"topic": "from-yaml", "endpoint": "tcp://*:6000"}}
    flag = '{"enable_kv_cache_events": true, "replay_endpoint": "tcp://*:5558", "topic": "kv"}'
    args = serve_parser().parse_args(["--kv-events-config", flag])
    cfg = parse_config(apply_overrides(raw, args)).kv_events
    assert cfg.enabled and cfg.publisher is None and cfg.form == "map"
    assert (cfg.endpoint, cfg.replay_endpoint, cfg.topic) == ("tcp://*:6000", "tcp://*:5558", "kv")
    assert (cfg.buffer_steps, cfg.hwm, cfg.max_queue_size) == (10_000, 100_000, 100_000)
    for bad, message in (("{nope", "invalid JSON"), ("[1]", "expected a JSON object")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides({}, serve_parser().parse_args(["--kv-events-config", bad]))


def test_kv_events_config_errors_name_the_section() -> None:
    assert not parse_config({}).kv_events.enabled
    with pytest.raises(ConfigError, match=r"kv_events: .*endpoint 'udp://x' must start"):
        parse_config({"kv_events": {"endpoint": "udp://x"}})
    with pytest.raises(ConfigError, match=r"kv_events\.hwm"):
        parse_config({"kv_events": {"hwm": -1}})
    two = {"kind": "tiny-gpt", "name": "b"}
    with pytest.raises(ConfigError, match=r"one model's prefix cache.*found 2: tiny-gpt, b"):
        parse_config(
            {"kv_events": {"enable_kv_cache_events": True}, "models": [{"kind": "tiny-gpt"}, two]}
        )
    # None to publish is no error: a launcher turns events on for every replica it starts.
    uncached = two | {"batcher": {"kind": "continuous", "prefix_cache": {"enabled": False}}}
    config = parse_config({"kv_events": {"enable_kv_cache_events": True}, "models": [uncached]})
    assert config.kv_events.enabled
