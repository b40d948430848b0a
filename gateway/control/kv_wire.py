"""KV cache events as vLLM and SGLang publish them over ZMQ (and our replica does): the frames of
a published message and of a replay reply, and the msgpack payload decoded into plain records.
Pure: no sockets here; the subscriber that feeds the cache state does the I/O.

Both engines changed the format over releases and a gateway meets every version, so all are
read: an event is a map tagged by "type" (current) or a positional array with the tag first
(older; fields were appended over releases and trailing defaults are omitted, so its length
varies); a batch is `[ts, events, dp_rank]`, `[ts, events]` or a map. Block hashes are opaque
keys: an int of any sign and size, or bytes (vLLM's default, a sha256 digest).

Payloads come from the network. Sizes are capped before msgpack allocates and every type is
checked (a bool is not an int here): a payload that cannot be used raises WireError, an event
that cannot be used is dropped and named in `Batch.rejected`, and the rest of its batch is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import msgpack  # type: ignore[import-untyped]

from gateway.errors import clipped

Hash = int | bytes
Engine = Literal["vllm", "sglang"]
TIER_GPU = "GPU"
END_SEQ = b"\xff" * 8  # a replay's end marker: vLLM sends seq -1 as signed 8 bytes
MAX_NAME_CHARS = 256  # medium, lora_name, kind: names, not text
MAX_MAP_LEN = 4096  # an event has about a dozen keys; more is not an event


@dataclass(frozen=True, slots=True)
class Stored:
    block_hashes: tuple[Hash, ...]
    parent: Hash | None
    token_ids: tuple[int, ...]  # len(block_hashes) * block_size of them
    block_size: int
    lora_name: str | None
    medium: str  # upper-cased; TIER_GPU when absent or None
    group_idx: int | None
    kind: str | None  # kv_cache_spec_kind: "full_attention", "sliding_window" ...
    extra_keys: tuple[tuple[object, ...] | None, ...] | None  # one per block (opaque)
    lora_id: int | None = None  # deprecated in vLLM, the only LoRA field of older engines


@dataclass(frozen=True, slots=True)
class Removed:
    block_hashes: tuple[Hash, ...]
    medium: str
    group_idx: int | None


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class Batch:
    ts: float
    events: tuple[Event, ...]
    dp_rank: int | None
    rejected: tuple[str, ...]  # one short reason per event dropped


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 16 * 1024 * 1024
    max_events: int = 100_000  # per batch
    max_blocks: int = 100_000  # block hashes per event
    max_tokens: int = 1024 * 1024  # token ids per event
    max_hash_bytes: int = 64


LIMITS = Limits()


class WireError(ValueError):
    """A message, replay reply or payload that cannot be used at all."""


class _BadEvent(ValueError):
    """One event that cannot be used; its batch is kept without it."""


# The positional form's fields after the tag, in order (the map form names the same fields).
# SGLang's 8th BlockStored element is a metadata map, not lora_name: it reads up to medium.
_STORED = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
_POSITIONAL: dict[str, dict[str, tuple[str, ...]]] = {
    "vllm": {
        "BlockStored": (
            *_STORED,
            "lora_name",
            "extra_keys",
            "group_idx",
            "kv_cache_spec_kind",
            "kv_cache_spec_sliding_window",
        ),
        "BlockRemoved": ("block_hashes", "medium", "group_idx"),
        "AllBlocksCleared": (),
    },
    "sglang": {
        "BlockStored": _STORED,
        "BlockRemoved": ("block_hashes", "medium"),
        "AllBlocksCleared": (),
    },
}


def message(frames: list[bytes]) -> tuple[bytes, int, bytes]:
    """A published message's frames as (topic, seq, payload)."""
    topic, seq, payload = _frames(frames, "a message is 3 frames (topic, seq, payload)")
    return topic, _seq(seq), payload


def replay_request(start_seq: int) -> list[bytes]:
    """What a DEALER sends the replay socket to get every buffered batch from start_seq on."""
    if not 0 <= start_seq < 2**64:
        raise ValueError(f"a seq is an unsigned 64-bit int, not {start_seq}")
    return [b"", start_seq.to_bytes(8, "big")]


def replay_reply(frames: list[bytes]) -> tuple[int, bytes] | None:
    """A DEALER's frames from the replay socket as (seq, payload); None for the end marker."""
    empty, seq, payload = _frames(frames, "a replay reply is 3 frames (empty, seq, payload)")
    if empty:
        raise WireError("a replay reply starts with an empty frame")
    return None if seq == END_SEQ else (_seq(seq), payload)


def _frames(frames: list[bytes], shape: str) -> list[bytes]:
    if len(frames) != 3:
        raise WireError(f"{shape}, not {len(frames)}")
    if not all(isinstance(frame, bytes) for frame in frames):
        raise WireError(f"{shape} of bytes")
    return frames


def _seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise WireError(f"a seq is 8 bytes, not {len(frame)}")
    return int.from_bytes(frame, "big")


def decode(payload: bytes, engine: Engine = "vllm", *, limits: Limits = LIMITS) -> Batch:
    """A published (or replayed) payload as a Batch. WireError for bytes that are not msgpack,
    a batch of another shape, or anything over the limits; a bad event only goes to `rejected`."""
    positional = _POSITIONAL.get(engine)
    if positional is None:
        raise ValueError(f"engine is 'vllm' or 'sglang', not {engine!r}")
    ts, listed, dp_rank = _batch(_unpack(payload, limits))
    if not isinstance(listed, list):
        raise WireError("a batch's events are not a list")
    if len(listed) > limits.max_events:
        raise WireError(f"{len(listed)} events in a batch, over {limits.max_events}")
    events: list[Event] = []
    rejected: list[str] = []
    for index, raw in enumerate(listed):
        try:
            events.append(_event(raw, positional, limits))
        except _BadEvent as error:
            rejected.append(f"event {index}: {error}")
    return Batch(ts, tuple(events), dp_rank, tuple(rejected))


def _unpack(payload: bytes, limits: Limits) -> object:
    if not isinstance(payload, bytes):
        raise WireError("a payload is bytes")
    if len(payload) > limits.max_payload_bytes:
        raise WireError(f"a payload of {len(payload)} bytes, over {limits.max_payload_bytes}")
    # msgpack allocates an array's slots when it reads the header, so max_array_len bounds each
    # array; nesting is bounded by its stack (1024 levels): at worst a few KiB of nested headers
    # hold about 70 MiB until the payload is refused.
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=False,
            max_array_len=max(limits.max_events, limits.max_blocks, limits.max_tokens),
            max_map_len=MAX_MAP_LEN,
            max_str_len=len(payload),
            max_bin_len=len(payload),
            max_ext_len=len(payload),
        )
    # msgpack fails in several ways: FormatError, ExtraData, StackError (all ValueError),
    # UnicodeDecodeError, TypeError for a map key that is an array; any of them is this payload's
    except Exception as error:
        why = clipped(str(error) or type(error).__name__)
        raise WireError(f"not a msgpack payload: {why}") from error


def _batch(decoded: object) -> tuple[float, object, int | None]:
    """(ts, events, dp_rank) of the batch, events unchecked. Trailing array elements a later
    release may add are ignored, as unknown keys of the map form are."""
    if isinstance(decoded, dict):
        rank_key = "data_parallel_rank" if "data_parallel_rank" in decoded else "attn_dp_rank"
        ts, events, dp_rank = decoded.get("ts"), decoded.get("events"), decoded.get(rank_key)
    elif isinstance(decoded, list) and len(decoded) >= 2:
        ts, events, dp_rank = decoded[0], decoded[1], decoded[2] if len(decoded) > 2 else None
    else:
        raise WireError("a batch is [ts, events, dp_rank], [ts, events] or a map")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise WireError("a batch's ts is not a finite number")
    if dp_rank is not None and (type(dp_rank) is not int or dp_rank < 0):
        raise WireError("a batch's dp_rank is not None or an int >= 0")
    return float(ts), events, dp_rank


def _event(raw: object, positional: dict[str, tuple[str, ...]], limits: Limits) -> Event:
    tag, fields = _fields(raw, positional)
    if tag == "BlockStored":
        return _stored(fields, limits)
    if tag == "BlockRemoved":
        hashes = _hashes(fields, limits)
        return Removed(hashes, _medium(fields), _index(fields, "group_idx"))
    if tag == "AllBlocksCleared":
        return Cleared()
    raise _BadEvent(f"unknown type {clipped(repr(tag[:MAX_NAME_CHARS]))}")


def _fields(
    raw: object, positional: dict[str, tuple[str, ...]]
) -> tuple[str, dict[object, object]]:
    """An event's type and its fields by name, from either form."""
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, list) and raw:
        tag = raw[0]
    else:
        raise _BadEvent("not a map or a non-empty array")
    if not isinstance(tag, str):
        raise _BadEvent("a type that is not a string")
    if isinstance(raw, dict):
        return tag, raw
    return tag, dict(zip(positional.get(tag, ()), raw[1:], strict=False))


def _stored(fields: dict[object, object], limits: Limits) -> Stored:
    hashes = _hashes(fields, limits)
    block_size = _int(fields, "block_size", minimum=1)
    tokens = _tokens(fields, limits)
    if len(tokens) != len(hashes) * block_size:
        raise _BadEvent(f"{len(tokens)} token_ids for {len(hashes)} blocks of {block_size}")
    parent = fields.get("parent_block_hash")
    return Stored(
        block_hashes=hashes,
        parent=None if parent is None else _hash(parent, "parent_block_hash", limits),
        token_ids=tokens,
        block_size=block_size,
        lora_name=_name(fields, "lora_name"),
        medium=_medium(fields),
        group_idx=_index(fields, "group_idx"),
        kind=_name(fields, "kv_cache_spec_kind"),
        extra_keys=_extra_keys(fields, len(hashes)),
        lora_id=None if fields.get("lora_id") is None else _int(fields, "lora_id"),
    )


def _hashes(fields: dict[object, object], limits: Limits) -> tuple[Hash, ...]:
    listed = fields.get("block_hashes")
    if not isinstance(listed, list):
        raise _BadEvent("block_hashes is not a list")
    if len(listed) > limits.max_blocks:
        raise _BadEvent(f"{len(listed)} block_hashes, over {limits.max_blocks}")
    return tuple(_hash(value, "a block hash", limits) for value in listed)


def _hash(value: object, what: str, limits: Limits) -> Hash:
    if type(value) is int or (isinstance(value, bytes) and 0 < len(value) <= limits.max_hash_bytes):
        return value
    raise _BadEvent(f"{what} is not an int or 1 to {limits.max_hash_bytes} bytes")


def _tokens(fields: dict[object, object], limits: Limits) -> tuple[int, ...]:
    listed = fields.get("token_ids")
    if not isinstance(listed, list):
        raise _BadEvent("token_ids is not a list")
    if len(listed) > limits.max_tokens:
        raise _BadEvent(f"{len(listed)} token_ids, over {limits.max_tokens}")
    if not all(type(token) is int and 0 <= token < 2**32 for token in listed):
        raise _BadEvent("a token id that is not an int in [0, 2**32)")
    return tuple(listed)


def _int(fields: dict[object, object], name: str, minimum: int | None = None) -> int:
    value = fields.get(name)
    if type(value) is not int or (minimum is not None and value < minimum):
        floor = "" if minimum is None else f" >= {minimum}"
        raise _BadEvent(f"{name} is not an int{floor}")
    return value


def _index(fields: dict[object, object], name: str) -> int | None:
    return None if fields.get(name) is None else _int(fields, name, minimum=0)


def _name(fields: dict[object, object], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        raise _BadEvent(f"{name} is not None or a string of at most {MAX_NAME_CHARS} chars")
    return value


def _medium(fields: dict[object, object]) -> str:
    medium = _name(fields, "medium")
    return TIER_GPU if medium is None else medium.upper()


def _extra_keys(
    fields: dict[object, object], blocks: int
) -> tuple[tuple[object, ...] | None, ...] | None:
    listed = fields.get("extra_keys")
    if listed is None:
        return None
    if not isinstance(listed, list) or len(listed) != blocks:
        raise _BadEvent(f"extra_keys is not None or a list of {blocks} (one per block)")
    if not all(keys is None or isinstance(keys, list) for keys in listed):
        raise _BadEvent("an entry of extra_keys is not None or an array")
    return tuple(None if keys is None else tuple(keys) for keys in listed)
