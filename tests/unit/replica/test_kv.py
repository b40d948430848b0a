"""Block bookkeeping: allocation, the documented hash chain, prefix hits, LRU eviction."""

from __future__ import annotations

import hashlib
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from replica.kv import BlockManager, chain_hashes


def documented_hash(parent: int, tokens: list[int]) -> int:
    """The scheme as README and `GET /cache/blocks` state it, written out independently."""
    data = struct.pack("<Q", parent) + struct.pack(f"<{len(tokens)}I", *tokens)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def test_hash_chain_follows_the_documented_scheme() -> None:
    tokens = list(range(256, 256 + 40))
    first = documented_hash(0, tokens[:16])
    assert chain_hashes(tokens, 16) == [first, documented_hash(first, tokens[16:32])]


def test_same_prefix_same_chain_and_a_different_block_breaks_it() -> None:
    a = chain_hashes(list(range(64)), 16)
    b = chain_hashes([*range(32), 999, *range(33, 64)], 16)
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]  # everything after a difference differs


def test_second_sequence_reuses_full_blocks_short_of_the_last_token() -> None:
    blocks = BlockManager(16, 4, prefix_cache=True)
    prompt = list(range(10))
    assert blocks.allocate(1, prompt) == 0
    blocks.commit(1, prompt, len(prompt))
    blocks.free(1)
    assert blocks.allocate(2, prompt) == 8  # two full blocks; the last token is recomputed
    assert blocks.allocate(3, list(range(8))) == 4  # exactly two blocks: the second recomputed
    stats = blocks.stats()
    assert (stats.queried_tokens, stats.hit_tokens) == (28, 12)


def test_without_the_prefix_cache_nothing_is_reused() -> None:
    blocks = BlockManager(16, 4, prefix_cache=False)
    blocks.allocate(1, list(range(10)))
    blocks.commit(1, list(range(10)), 10)
    blocks.free(1)
    assert blocks.allocate(2, list(range(10))) == 0
    assert blocks.cached_hashes() == []


def test_allocation_fails_when_blocks_do_not_fit_and_frees_give_them_back() -> None:
    blocks = BlockManager(4, 4, prefix_cache=True)
    assert blocks.allocate(1, list(range(12))) == 0  # 3 blocks
    assert blocks.allocate(2, list(range(100, 108))) is None  # needs 2, 1 left
    assert blocks.grow(1, 13)  # the 4th block
    assert not blocks.grow(1, 17)
    blocks.free(1, preempted=True)
    assert blocks.stats().preemptions == 1
    assert blocks.allocate(2, list(range(100, 108))) == 0


def test_unreferenced_cached_blocks_are_evicted_least_recently_used_tail_first() -> None:
    blocks = BlockManager(6, 4, prefix_cache=True)
    old, new = list(range(9)), list(range(50, 59))  # 2 full blocks + 1 partial each
    for seq, prompt in ((1, old), (2, new)):
        blocks.allocate(seq, prompt)
        blocks.commit(seq, prompt, len(prompt))
        blocks.free(seq)
    assert len(blocks.cached_hashes()) == 4
    assert blocks.allocate(3, new) == 8  # reuses `new`: it is the most recently used now
    assert blocks.allocate(4, list(range(90, 95))) == 0  # 2 blocks: 1 free + 1 evicted
    old_head, old_tail = chain_hashes(old, 4)
    cached = set(blocks.cached_hashes())
    assert old_tail not in cached  # the least recently used chain loses its tail first
    assert {old_head, *chain_hashes(new, 4)} <= cached


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alloc", "free", "grow"]), st.integers(0, 5), st.integers(1, 40)
        ),
        max_size=60,
    )
)
def test_block_counts_stay_exact_under_any_sequence(ops: list[tuple[str, int, int]]) -> None:
    blocks = BlockManager(12, 4, prefix_cache=True)
    held: dict[int, list[int]] = {}
    for op, seq, n in ops:
        if op == "alloc" and seq not in held:
            prompt = [seq % 2] * n  # two families of prompts, so prefixes are shared
            if blocks.allocate(seq, prompt) is not None:
                held[seq] = prompt
                blocks.commit(seq, prompt, len(prompt))
        elif op == "grow" and seq in held:
            if blocks.grow(seq, len(held[seq]) + 1):
                held[seq].append(seq % 2)
        elif op == "free" and seq in held:
            blocks.free(seq)
            del held[seq]
        tables = [blocks.table(s) for s in held]
        distinct = {b for t in tables for b in t}
        assert blocks.stats().used_blocks == len(distinct)
        assert all(
            len(t) == blocks.blocks_for(len(held[s])) for s, t in zip(held, tables, strict=True)
        )
    for seq in list(held):
        blocks.free(seq)
    assert blocks.stats().used_blocks == 0
