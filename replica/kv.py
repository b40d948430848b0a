"""Paged KV memory and the prefix cache: engine-independent block bookkeeping (as vLLM's).

KV memory is `num_blocks` blocks of `block_size` token slots. A sequence holds a block table:
block `i` holds the keys/values of its tokens `[i * block_size, (i + 1) * block_size)`. Engines
that keep real tensors (the torch engine) index one pool by slot `block * block_size + offset`;
the simulated engine ignores the tables and only the counting matters.

With the prefix cache on, every full block is known by a chained hash of its parent block's
hash and its own token ids, so the same prefix always yields the same chain:

    h(-1) = 0
    h(i)  = int.from_bytes(blake2b(h(i-1).to_bytes(8, "little")
                                   + uint32-LE bytes of the block's token ids,
                                   digest_size=8).digest(), "little")

A new sequence reuses the longest chain of cached blocks that matches its tokens and computes
only the rest. Blocks no sequence references stay cached until their space is needed, then go
least recently used first. `GET /cache/blocks` publishes the cached hashes (`HASH_SCHEME`).

Given a `sink`, the manager also reports what its cache did, as vLLM's KV cache events do
(`replica/kv_events.py` puts them on the wire): `BlocksStored` when `commit` registers blocks,
`BlocksRemoved` when a cached block is evicted for reuse.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

HASH_SCHEME = "blake2b-64 chained: h = blake2b(parent_hash u64 LE || token ids u32 LE, 8 bytes)"


def chain_hashes(token_ids: Sequence[int], block_size: int, parent: int = 0) -> list[int]:
    """The chained hash of each full block of `token_ids` (a trailing partial block has none)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        data = parent.to_bytes(8, "little") + _u32le(token_ids[start : start + block_size])
        parent = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        hashes.append(parent)
    return hashes


def _u32le(token_ids: Sequence[int]) -> bytes:
    ids = array("I", token_ids)
    if ids.itemsize != 4 or array("I", [1]).tobytes()[0] != 1:  # pragma: no cover - exotic ABI
        return b"".join(t.to_bytes(4, "little") for t in token_ids)
    return ids.tobytes()


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """Blocks newly registered in the cache: one run of a chain, `parent` the hash before it
    (None at the chain's start), `token_ids` those blocks' tokens."""

    hashes: tuple[int, ...]
    parent: int | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CacheCleared:
    """Nothing is cached (a cache just created)."""


CacheEvent = BlocksStored | BlocksRemoved | CacheCleared
EventSink = Callable[[CacheEvent], object]


def stored_runs(
    chain: Sequence[int], token_ids: Sequence[int], stored: Sequence[int], block_size: int
) -> list[BlocksStored]:
    """One `BlocksStored` per run of consecutive newly registered blocks (indices `stored`
    into `chain`). A block whose hash another block already held was reported then, so it is
    left out, and the run after it names it as parent: every parent was reported stored
    before (it may have been evicted since)."""
    runs: list[list[int]] = []
    for index in stored:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return [
        BlocksStored(
            tuple(chain[run[0] : run[-1] + 1]),
            chain[run[0] - 1] if run[0] else None,
            tuple(token_ids[run[0] * block_size : (run[-1] + 1) * block_size]),
            block_size,
        )
        for run in runs
    ]


@dataclass
class _Block:
    id: int
    refs: int = 0
    hash: int | None = None  # set once the block is full and registered in the cache


@dataclass
class SeqBlocks:
    """One sequence's block table and how many of its leading tokens came from the cache."""

    table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chain of its full blocks, so far
    cached_tokens: int = 0


@dataclass(frozen=True)
class CacheStats:
    queried_tokens: int
    hit_tokens: int
    used_blocks: int
    num_blocks: int
    preemptions: int

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks


class BlockManager:
    """Allocation, reference counts, the hash -> block map and LRU eviction of unused blocks.

    Not thread-safe: the batcher's event-loop task is its only caller.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        prefix_cache: bool,
        sink: EventSink | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never cached, pop() = 0..
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self._cached: dict[int, int] = {}  # hash -> block id
        self._seqs: dict[int, SeqBlocks] = {}
        self._sink = sink
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.preemptions = 0

    # -- sizes ------------------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @property
    def available(self) -> int:
        """Blocks a new allocation may take: never-used ones plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    def stats(self) -> CacheStats:
        used = self.num_blocks - self.available
        return CacheStats(
            self.queried_tokens, self.hit_tokens, used, self.num_blocks, self.preemptions
        )

    def cached_hashes(self) -> list[int]:
        return list(self._cached)

    def table(self, seq_id: int) -> list[int]:
        return self._seqs[seq_id].table

    # -- sequences --------------------------------------------------------------------------

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int | None:
        """Blocks for all of `token_ids`, reusing the longest cached prefix; returns the number
        of leading tokens already computed (a multiple of the block size, always short of the
        last token, whose logits are needed), or None when the blocks do not fit."""
        hits: list[int] = []
        hashes: list[int] = []
        if self.prefix_cache:
            hashes = chain_hashes(token_ids[: len(token_ids) - 1], self.block_size)
            for h in hashes:
                block = self._cached.get(h)
                if block is None:
                    break
                hits.append(block)
        fresh = self.blocks_for(len(token_ids)) - len(hits)
        reclaimable = sum(1 for b in hits if self._blocks[b].refs == 0)
        if fresh > self.available - reclaimable:
            return None
        seq = SeqBlocks(hashes=hashes[: len(hits)], cached_tokens=len(hits) * self.block_size)
        for block in hits:
            self._ref(block)
        seq.table = hits + [self._take() for _ in range(fresh)]
        self._seqs[seq_id] = seq
        self.queried_tokens += len(token_ids)
        self.hit_tokens += seq.cached_tokens
        return seq.cached_tokens

    def grow(self, seq_id: int, tokens: int) -> bool:
        """Make room for the sequence to hold `tokens` tokens; False when out of blocks."""
        seq = self._seqs[seq_id]
        if tokens <= len(seq.table) * self.block_size:  # most decode steps
            return True
        need = self.blocks_for(tokens) - len(seq.table)
        if need > self.available:
            return False
        seq.table.extend(self._take() for _ in range(need))
        return True

    def commit(self, seq_id: int, token_ids: Sequence[int], computed: int) -> None:
        """Register in the cache the sequence's blocks that became full: those whose tokens
        (`token_ids[:computed]`) are all computed."""
        if not self.prefix_cache:
            return
        seq = self._seqs[seq_id]
        full = computed // self.block_size
        if full <= len(seq.hashes):
            return
        first = len(seq.hashes)
        parent = seq.hashes[-1] if seq.hashes else 0
        start = first * self.block_size
        new = chain_hashes(token_ids[start : full * self.block_size], self.block_size, parent)
        stored: list[int] = []
        for index, h in enumerate(new, start=first):
            block = self._blocks[seq.table[index]]
            if block.hash is None and h not in self._cached:
                block.hash = h
                self._cached[h] = block.id
                stored.append(index)
        seq.hashes.extend(new)
        if self._sink is not None and stored:
            for event in stored_runs(seq.hashes, token_ids, stored, self.block_size):
                self._sink(event)

    def free(self, seq_id: int, *, preempted: bool = False) -> None:
        """Drop a finished, cancelled or preempted sequence's references (newest block first,
        so a chain's tail is evicted before its head)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        self.preemptions += preempted
        for block_id in reversed(seq.table):
            block = self._blocks[block_id]
            block.refs -= 1
            if block.refs == 0:
                if block.hash is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None

    # -- blocks -----------------------------------------------------------------------------

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.refs == 0:
            self._evictable.pop(block_id, None)
        block.refs += 1

    def _take(self) -> int:
        if self._free:
            block_id = self._free.pop()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            evicted = self._blocks[block_id]
            if evicted.hash is not None:
                del self._cached[evicted.hash]
                if self._sink is not None:
                    self._sink(BlocksRemoved((evicted.hash,)))
                evicted.hash = None
        self._blocks[block_id].refs = 1
        return block_id
