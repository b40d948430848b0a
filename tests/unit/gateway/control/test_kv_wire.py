"""KV cache events off the wire: every form vLLM and SGLang have sent (tagged maps, positional
arrays of each length, the batch as a 2-array, a 3-array or a map), every field, and hostile
payloads, which only ever give WireError (the payload) or a rejected event (the rest kept)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.control.kv_wire import (
    TIER_GPU,
    Batch,
    Cleared,
    Engine,
    Event,
    Limits,
    Removed,
    Stored,
    WireError,
    decode,
    message,
    replay_reply,
    replay_request,
)

U64_MAX = 2**64 - 1
I64_MIN = -(2**63)
SHA = bytes(range(32))  # vLLM's default block hash: a sha256 digest
TOKENS = list(range(100, 132))  # two blocks of 16


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def batch_of(*events: Any) -> bytes:
    return pack([1.5, list(events), 0])


def only(event: Any, engine: Engine = "vllm") -> Event:
    """The one event a batch of `event` decodes to."""
    batch = decode(batch_of(event), engine)
    assert batch.rejected == ()
    (decoded,) = batch.events
    return decoded


def reason(event: Any, engine: Engine = "vllm") -> str:
    """Why the one event of a batch was dropped."""
    batch = decode(batch_of(event), engine)
    assert batch.events == ()
    (why,) = batch.rejected
    assert why.startswith("event 0: ")
    return why


def stored_map(**fields: Any) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "parent_block_hash": None,
        "token_ids": TOKENS,
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    } | fields


PLAIN = Stored((11, 12), None, tuple(TOKENS), 16, None, TIER_GPU, None, None, None)  # stored_map's


def plain_stored(**fields: Any) -> Stored:
    return dataclasses.replace(PLAIN, **fields)


# Frames of a message and of replay.


def test_message_is_topic_seq_payload() -> None:
    assert message([b"kv@r1", (5).to_bytes(8, "big"), b"p"]) == (b"kv@r1", 5, b"p")
    assert message([b"", b"\xff" * 8, b""]) == (b"", U64_MAX, b"")


@pytest.mark.parametrize(
    "frames",
    [
        [b"t", b"\x00" * 8],
        [b"t", b"\x00" * 8, b"p", b"extra"],
        [],
        [b"t", b"\x00" * 7, b"p"],
        [b"t", b"\x00" * 9, b"p"],
        [b"t", "12345678", b"p"],
    ],
)
def test_a_message_of_other_frames_is_a_wire_error(frames: Any) -> None:
    with pytest.raises(WireError):
        message(frames)


def test_replay_request_is_an_empty_frame_and_the_start_seq() -> None:
    assert replay_request(0) == [b"", b"\x00" * 8]
    assert replay_request(258) == [b"", b"\x00" * 6 + b"\x01\x02"]
    assert replay_request(U64_MAX) == [b"", b"\xff" * 8]
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="unsigned 64-bit"):
            replay_request(bad)


def test_replay_reply_is_seq_and_payload_and_none_at_the_end_marker() -> None:
    assert replay_reply([b"", (7).to_bytes(8, "big"), b"payload"]) == (7, b"payload")
    assert replay_reply([b"", b"\xff" * 8, b""]) is None


@pytest.mark.parametrize(
    "frames",
    [
        [b"x", b"\x00" * 8, b"p"],  # not the empty delimiter
        [b"\x00" * 8, b"p"],
        [b"", b"\x00" * 8, b"p", b""],
        [b"", b"\x00" * 4, b"p"],
        [None, b"\x00" * 8, b"p"],
    ],
)
def test_a_replay_reply_of_other_frames_is_a_wire_error(frames: Any) -> None:
    with pytest.raises(WireError):
        replay_reply(frames)


# Events as maps (vLLM after #42892, SGLang after #37482).


def test_a_captured_vllm_batch() -> None:
    """As vLLM 0.26 sent it (kthena#1535): a 3-array batch, a map event, a u64 hash > 2**63."""
    tokens = list(range(16))
    payload = pack(
        [
            1789095808.83,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [15760518052499183552],
                    "parent_block_hash": None,
                    "token_ids": tokens,
                    "block_size": 16,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "extra_keys": [None],
                    "group_idx": 0,
                    "kv_cache_spec_kind": "full_attention",
                }
            ],
            0,
        ]
    )
    expected = Stored(
        block_hashes=(15760518052499183552,),
        parent=None,
        token_ids=tuple(tokens),
        block_size=16,
        lora_name=None,
        medium="GPU",
        group_idx=0,
        kind="full_attention",
        extra_keys=(None,),
    )
    assert decode(payload) == Batch(1789095808.83, (expected,), 0, ())


def test_every_stored_field_by_name() -> None:
    event = stored_map(
        block_hashes=[SHA, b"\x01" * 32],
        parent_block_hash=b"\x02" * 32,
        lora_id=3,
        medium="cpu",
        lora_name="adapter-a",
        extra_keys=[None, ["salt", 7, ["mm", 0]]],
        group_idx=2,
        kv_cache_spec_kind="sliding_window",
        kv_cache_spec_sliding_window=1024,
    )
    assert only(event) == Stored(
        block_hashes=(SHA, b"\x01" * 32),
        parent=b"\x02" * 32,
        token_ids=tuple(TOKENS),
        block_size=16,
        lora_name="adapter-a",
        medium="CPU",
        group_idx=2,
        kind="sliding_window",
        extra_keys=(None, ("salt", 7, ["mm", 0])),
        lora_id=3,
    )


def test_absent_fields_take_their_defaults_and_unknown_keys_are_ignored() -> None:
    event = {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "token_ids": TOKENS,
        "block_size": 16,
        "cache_salt": "tenant-a",  # SGLang's, unknown to us
        "session_id": 9,
        5: "a key that is not a string",
    }
    assert only(event) == PLAIN
    assert only(event, "sglang") == PLAIN


def test_removed_and_cleared_by_name() -> None:
    removed = {"type": "BlockRemoved", "block_hashes": [SHA, 5], "medium": None, "group_idx": 1}
    assert only(removed) == Removed((SHA, 5), TIER_GPU, 1)
    assert only({"type": "BlockRemoved", "block_hashes": [5]}) == Removed((5,), TIER_GPU, None)
    assert only({"type": "BlockRemoved", "block_hashes": [5], "medium": "CPU_TIER2"}) == Removed(
        (5,), "CPU_TIER2", None
    )
    assert only({"type": "AllBlocksCleared", "extra": 1}) == Cleared()


def test_medium_is_upper_cased_and_gpu_when_absent() -> None:
    assert only(stored_map(medium=None)) == plain_stored(medium="GPU")
    assert only(stored_map(medium="gpu")) == plain_stored(medium="GPU")
    assert only(stored_map(medium="Cpu_Tier1")) == plain_stored(medium="CPU_TIER1")


# Events as positional arrays, tag first (older vLLM; SGLang before #37482).


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ([], {}),  # 6 elements: vLLM < 0.11
        (["cpu"], {"medium": "CPU"}),  # 7: medium
        (["GPU", "lora-b"], {"lora_name": "lora-b"}),  # 8: lora_name
        (["GPU", None, [None, ["x"]]], {"extra_keys": (None, ("x",))}),  # 9: extra_keys
        (["GPU", None, None, 1], {"group_idx": 1}),  # 10: group_idx
        (
            ["GPU", None, None, 0, "full_attention", 4096],
            {"group_idx": 0, "kind": "full_attention"},
        ),
        (["GPU", None, None, 0, "mamba", None, "future field"], {"group_idx": 0, "kind": "mamba"}),
    ],
)
def test_vllm_stored_arrays_of_every_length(tail: list[Any], expected: dict[str, Any]) -> None:
    event = ["BlockStored", [11, 12], None, TOKENS, 16, None, *tail]
    assert only(event) == plain_stored(**expected)


def test_positional_parent_and_lora_id() -> None:
    event = ["BlockStored", [SHA], b"\x09" * 32, TOKENS[:16], 16, 4]
    decoded = only(event)
    assert isinstance(decoded, Stored)
    assert (decoded.block_hashes, decoded.parent, decoded.lora_id) == ((SHA,), b"\x09" * 32, 4)


def test_sglang_arrays_read_up_to_medium() -> None:
    metadata = {"cache_salt": "tenant-a"}
    event = ["BlockStored", [11, 12], None, TOKENS, 16, None, "CPU_TIER1", metadata]
    assert only(event, "sglang") == plain_stored(medium="CPU_TIER1")
    assert only(event[:7], "sglang") == plain_stored(medium="CPU_TIER1")
    assert only(event[:6], "sglang") == plain_stored()
    # Read as vLLM, the metadata map would be lora_name: the engine is what tells them apart.
    assert "lora_name" in reason(event, "vllm")


def test_removed_arrays_of_every_length() -> None:
    assert only(["BlockRemoved", [1, 2]]) == Removed((1, 2), TIER_GPU, None)
    assert only(["BlockRemoved", [1], "cpu"]) == Removed((1,), "CPU", None)
    assert only(["BlockRemoved", [1], None, 3]) == Removed((1,), TIER_GPU, 3)
    assert only(["BlockRemoved", [1], "GPU", 3, "later"]) == Removed((1,), TIER_GPU, 3)
    # SGLang's BlockRemoved has no group_idx: a 4th element is not read as one.
    assert only(["BlockRemoved", [1], "CPU_TIER2", "x"], "sglang") == Removed(
        (1,), "CPU_TIER2", None
    )


def test_cleared_array() -> None:
    assert only(["AllBlocksCleared"]) == Cleared()
    assert only(["AllBlocksCleared"], "sglang") == Cleared()


# The batch.


@pytest.mark.parametrize(
    ("decoded", "ts", "dp_rank"),
    [
        ([2.5, []], 2.5, None),
        ([2.5, [], 3], 2.5, 3),
        ([2.5, [], None], 2.5, None),
        ([2, [], 1, "a later field"], 2.0, 1),  # an int ts; trailing elements ignored
        ({"ts": 2.5, "events": [], "data_parallel_rank": 4}, 2.5, 4),
        ({"ts": 2.5, "events": [], "attn_dp_rank": 5}, 2.5, 5),
        ({"ts": 2.5, "events": [], "data_parallel_rank": None, "attn_dp_rank": 5}, 2.5, None),
        ({"ts": 2.5, "events": [], "other": "ignored"}, 2.5, None),
    ],
)
def test_batch_forms(decoded: Any, ts: float, dp_rank: int | None) -> None:
    decoded_batch = decode(pack(decoded))
    assert decoded_batch == Batch(ts, (), dp_rank, ())
    assert type(decoded_batch.ts) is float


def test_a_batch_keeps_good_events_in_order_and_names_the_dropped_ones() -> None:
    payload = batch_of(
        {"type": "AllBlocksCleared"},
        {"type": "Nope"},
        ["BlockRemoved", [1]],
        stored_map(token_ids=TOKENS[:-1]),
        ["AllBlocksCleared"],
    )
    batch = decode(payload)
    assert batch.events == (Cleared(), Removed((1,), TIER_GPU, None), Cleared())
    assert batch.rejected == (
        "event 1: unknown type 'Nope'",
        "event 3: 31 token_ids for 2 blocks of 16",
    )


# Block hashes: opaque ints of any sign and size, or bytes.


@pytest.mark.parametrize("value", [0, 2**63, U64_MAX, -1, I64_MIN, SHA, b"\x00", b"\xff" * 64])
def test_hashes_are_ints_or_bytes(value: int | bytes) -> None:
    tokens = list(range(16))
    decoded = only(stored_map(block_hashes=[value], parent_block_hash=value, token_ids=tokens))
    assert isinstance(decoded, Stored)
    assert decoded.block_hashes == (value,) and decoded.parent == value
    assert only(["BlockRemoved", [value]]) == Removed((value,), TIER_GPU, None)


@pytest.mark.parametrize("value", [True, False, 1.0, "abc", b"", b"\x00" * 65, None, [1], {}])
def test_other_hashes_reject_the_event(value: Any) -> None:
    assert "block hash" in reason(stored_map(block_hashes=[value], token_ids=TOKENS[:16]))
    assert "block hash" in reason({"type": "BlockRemoved", "block_hashes": [1, value]})


@pytest.mark.parametrize("value", [True, 1.5, "p", b"", [1]])
def test_another_parent_rejects_the_event(value: Any) -> None:
    assert "parent_block_hash" in reason(stored_map(parent_block_hash=value))


# Bad events: each rejected, with a short reason.


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (stored_map(token_ids=[*TOKENS, 1]), "33 token_ids for 2 blocks of 16"),
        (stored_map(block_size=8), "32 token_ids for 2 blocks of 8"),
        (stored_map(block_hashes=[], token_ids=TOKENS), "32 token_ids for 0 blocks of 16"),
        (stored_map(block_size=0), "block_size is not an int >= 1"),
        (stored_map(block_size=True), "block_size is not an int >= 1"),
        (stored_map(block_size=16.0), "block_size is not an int >= 1"),
        (stored_map(block_size="16"), "block_size is not an int >= 1"),
        (stored_map(token_ids=[True] * 32), "token id"),
        (stored_map(token_ids=[-1] * 32), "token id"),
        (stored_map(token_ids=[2**32] * 32), "token id"),
        (stored_map(token_ids=[1.0] * 32), "token id"),
        (stored_map(token_ids="abc"), "token_ids is not a list"),
        (stored_map(block_hashes=7), "block_hashes is not a list"),
        (stored_map(block_hashes={"a": 1}), "block_hashes is not a list"),
        (stored_map(medium=1), "medium"),
        (stored_map(medium="G" * 257), "medium"),
        (stored_map(lora_name=b"bytes"), "lora_name"),
        (stored_map(kv_cache_spec_kind=3), "kv_cache_spec_kind"),
        (stored_map(group_idx=True), "group_idx"),
        (stored_map(group_idx=-1), "group_idx"),
        (stored_map(group_idx="0"), "group_idx"),
        (stored_map(lora_id=False), "lora_id"),
        (stored_map(extra_keys=[None]), "extra_keys"),  # one per block: 2 here
        (stored_map(extra_keys="salt"), "extra_keys"),
        (stored_map(extra_keys=[None, "salt"]), "extra_keys"),
        ({"type": "BlockStored", "token_ids": [], "block_size": 16}, "block_hashes"),
        ({"type": "BlockStored", "block_hashes": [], "block_size": 16}, "token_ids"),
        ({"type": "BlockStored", "block_hashes": [], "token_ids": []}, "block_size"),
        (["BlockStored", [1], None], "block_size"),  # too short to hold the required fields
        ({"type": "BlockRemoved"}, "block_hashes"),
        ({"type": "BlockRemoved", "block_hashes": [1], "medium": ["GPU"]}, "medium"),
        (["BlockRemoved", [1], "GPU", False], "group_idx"),
        ({"type": "Foo"}, "unknown type 'Foo'"),
        (["Foo", 1, 2], "unknown type 'Foo'"),
        ({"type": "blockstored"}, "unknown type"),
        ({"type": 1}, "a type that is not a string"),
        ({"type": None}, "a type that is not a string"),
        ({"type": b"BlockStored"}, "a type that is not a string"),
        ({"block_hashes": [1]}, "a type that is not a string"),
        ([1, [1]], "a type that is not a string"),
        ([], "not a map or a non-empty array"),
        (7, "not a map or a non-empty array"),
        ("BlockStored", "not a map or a non-empty array"),
        (None, "not a map or a non-empty array"),
    ],
)
def test_bad_events_are_rejected(event: Any, why: str) -> None:
    assert why in reason(event)


def test_a_huge_tag_is_quoted_clipped() -> None:
    assert len(reason({"type": "x" * 100_000})) < 300


def test_limits_per_event_reject_the_event_only() -> None:
    limits = Limits(max_blocks=2, max_tokens=32, max_hash_bytes=4)
    payload = batch_of(
        stored_map(),
        stored_map(block_hashes=[1, 2, 3], token_ids=TOKENS[:3], block_size=1),
        stored_map(block_hashes=[1, 2, 3, 4], token_ids=TOKENS + TOKENS, block_size=16),
        stored_map(block_hashes=[b"12345", 1]),
        {"type": "BlockRemoved", "block_hashes": [b"1234"]},
    )
    batch = decode(payload, limits=limits)
    assert batch.events == (PLAIN, Removed((b"1234",), TIER_GPU, None))
    assert batch.rejected == (
        "event 1: 3 block_hashes, over 2",
        "event 2: 4 block_hashes, over 2",
        "event 3: a block hash is not an int or 1 to 4 bytes",
    )
    tokens = stored_map(block_hashes=[1], token_ids=list(range(33)), block_size=33)
    assert decode(batch_of(tokens), limits=limits).rejected == ("event 0: 33 token_ids, over 32",)


# Payloads that cannot be used: WireError, never another exception.


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x93\xcb",  # truncated
        pack([1.0, []]) + b"\x00",  # extra data
        b"\x92\xcb" + b"\x00" * 8 + b"\x91\xa2\xff\xfe",  # invalid UTF-8
        b"\x81\x91\x01\x02",  # a map whose key is an array
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion elements
        b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion pairs
        b"\xdb\xff\xff\xff\xff",  # a string claiming 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bytes claiming 4 GiB
        b"\x91" * 100_000 + b"\xc0",  # nested deeper than any decoder's stack
        (b"\xdd" + (2**20).to_bytes(4, "big")) * 1100,  # nested arrays each claiming 1M slots
        b"\xd6\xff\x00",  # a timestamp ext cut short
        pack([1.0]),
        pack([]),
        pack("BlockStored"),
        pack(None),
        pack(1.0),
        pack([1.0, "events", 0]),
        pack([1.0, {"type": "AllBlocksCleared"}, 0]),
        pack(["1.0", [], 0]),
        pack([None, [], 0]),
        pack([True, [], 0]),
        pack([math.nan, [], 0]),
        pack([math.inf, [], 0]),
        pack([1.0, [], True]),
        pack([1.0, [], -1]),
        pack([1.0, [], "0"]),
        pack({"events": []}),
        pack({"ts": 1.0}),
        pack({"ts": 1.0, "events": [], "attn_dp_rank": 1.0}),
    ],
)
def test_unusable_payloads_are_wire_errors(payload: bytes) -> None:
    with pytest.raises(WireError):
        decode(payload)


def test_payload_and_event_count_limits() -> None:
    payload = batch_of({"type": "AllBlocksCleared"}, {"type": "AllBlocksCleared"})
    with pytest.raises(WireError, match="over 10"):
        decode(payload, limits=Limits(max_payload_bytes=10))
    with pytest.raises(WireError, match="2 events in a batch, over 1"):
        decode(payload, limits=Limits(max_events=1))
    with pytest.raises(WireError, match="exceeds max_array_len"):
        decode(pack([1.0, [0] * 11, 0]), limits=Limits(max_events=10, max_blocks=5, max_tokens=5))
    assert len(decode(payload, limits=Limits(max_events=2)).events) == 2


def test_a_payload_that_is_not_bytes_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        decode(bytearray(batch_of()))  # type: ignore[arg-type]


def test_an_unknown_engine_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="engine"):
        decode(batch_of(), "tgi")  # type: ignore[arg-type]


# Fuzzing: decode returns a Batch or raises WireError, nothing else.


def decoded_or_wire_error(payload: bytes, engine: Engine) -> None:
    try:
        batch = decode(payload, engine)
    except WireError:
        return
    assert isinstance(batch, Batch)
    assert len(batch.events) + len(batch.rejected) <= len(payload)


LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(I64_MIN, U64_MAX)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=70)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "type"])
)
VALUES = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=8)
        | st.dictionaries(st.text(max_size=12) | st.integers(-5, 5), children, max_size=8)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
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
        "ts",
        "events",
        "data_parallel_rank",
        "attn_dp_rank",
    ]
)
# Near misses: events of the right tags and field names with any values.
EVENTS = st.one_of(
    st.dictionaries(FIELDS, VALUES, max_size=8).map(lambda d: {"type": "BlockStored"} | d),
    st.builds(
        lambda tag, rest: [tag, *rest],
        st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared"]),
        st.lists(VALUES, max_size=12),
    ),
    VALUES,
)
BATCHES = st.one_of(
    st.builds(
        lambda ts, events, rank: [ts, events, rank], LEAVES, st.lists(EVENTS, max_size=4), LEAVES
    ),
    st.builds(lambda ts, events: [ts, events], st.floats(), st.lists(EVENTS, max_size=4)),
    st.dictionaries(FIELDS, VALUES | st.lists(EVENTS, max_size=4), max_size=5),
    VALUES,
)
ENGINES = st.sampled_from(["vllm", "sglang"])


@given(st.binary(max_size=300), ENGINES)
@settings(max_examples=300)
def test_arbitrary_bytes_decode_or_raise_wire_error(payload: bytes, engine: Engine) -> None:
    decoded_or_wire_error(payload, engine)


@given(BATCHES, ENGINES)
@settings(max_examples=200)
def test_arbitrary_structures_decode_or_raise_wire_error(value: Any, engine: Engine) -> None:
    decoded_or_wire_error(pack(value), engine)


@given(BATCHES, ENGINES, st.integers(0, 200), st.binary(min_size=1, max_size=4))
@settings(max_examples=200)
def test_damaged_payloads_decode_or_raise_wire_error(
    value: Any, engine: Engine, at: int, damage: bytes
) -> None:
    payload = pack(value)
    at = at % (len(payload) + 1)
    decoded_or_wire_error(payload[:at] + damage + payload[at + len(damage) :], engine)
    decoded_or_wire_error(payload[:at], engine)
