"""Prompt prefixes for prefix-aware routing: a prompt's KV blocks, hashed as the replicas hash
them, and a bounded index of which replica was sent which blocks.

The encoding is the one our replicas publish on `GET /cache/blocks` (`hash_scheme`,
`tokenizer`; replica/kv.py), implemented here from that description as any router would: token
ids are BOS (256) then the prompt's UTF-8 bytes; a chat request's messages are first rendered
with the byte models' template (`<|role|>\\ncontent\\n` per message, text parts joined with
nothing between them, then `<|assistant|>\\n`). Full blocks of `block_size` tokens are hashed
in a chain, so equal hashes mean equal prefixes:

    h(-1) = 0;  h(i) = blake2b(h(i-1) as u64 LE || block i's ids as u32 LE, 8 bytes) as u64 LE

In front of an engine with another tokenizer the hashes are still a stable fingerprint of the
prompt's prefix, which is all the approximate index needs.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BOS = 256
HASH_SCHEME = "blake2b-64 chained: h = blake2b(parent_hash u64 LE || token ids u32 LE, 8 bytes)"
TOKENIZER = "bytes: BOS (256) then the UTF-8 bytes of the prompt"


def prompt_text(payload: dict[str, Any]) -> str | None:
    """The text a byte-level replica encodes: a completion's prompt (the first of a list), or
    a chat request's messages through the template. None: not a request with a prompt."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    parts = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        if not isinstance(content, str):
            return None
        parts.append(f"<|{message['role']}|>\n{content}\n")
    return "".join(parts) + "<|assistant|>\n"


def block_hashes(text: str, block_size: int, max_tokens: int) -> tuple[int, ...]:
    """The chained hashes of the full blocks among the first `max_tokens` tokens of `text`."""
    data = text.encode("utf-8", errors="surrogatepass")[: max(0, max_tokens - 1)]
    return tuple(chain((BOS, *data), block_size))


def chain(ids: Sequence[int], block_size: int, parent: int = 0) -> list[int]:
    """The chained hash of each full block of token `ids`, the first one chained to `parent`
    (a trailing partial block has none)."""
    hashes = []
    pack = struct.Struct(f"<Q{block_size}I").pack
    for start in range(0, len(ids) - block_size + 1, block_size):
        block = pack(parent, *ids[start : start + block_size])
        parent = int.from_bytes(hashlib.blake2b(block, digest_size=8).digest(), "little")
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Which replica holds which blocks, as far as the gateway knows: at most `max_entries`
    (block, replica) pairs, least recently used evicted first; lookups walk a prompt's chain
    once (O(blocks + replicas)). A pair has a weight: 1 for a block the replica can use at once;
    less for one it holds in a slower tier (host memory), which saves less prefill."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._lru: OrderedDict[tuple[int, str], float] = OrderedDict()  # -> weight
        self._holders: dict[int, set[str]] = {}
        self._by_url: dict[str, set[int]] = {}
        self._weighted = False  # a weight other than 1 was ever held: matching reads weights

    def __len__(self) -> int:
        return len(self._lru)

    def insert(self, url: str, hashes: Iterable[int]) -> None:
        """`url` was sent these blocks (weight 1; the most recent last in LRU). The gateway's
        hot path for prefix_aware: one pass, no per-block weight."""
        lru = self._lru
        for h in hashes:
            key = (h, url)
            if key in lru:
                lru.move_to_end(key)
                continue
            lru[key] = 1.0
            self._holders.setdefault(h, set()).add(url)
            self._by_url.setdefault(url, set()).add(h)
        self._trim()

    def hold(self, url: str, weights: Mapping[int, float]) -> None:
        """`url` holds these blocks now, with these weights (the most recent last in LRU)."""
        lru = self._lru
        for h, weight in weights.items():
            key = (h, url)
            if key in lru:
                lru.move_to_end(key)
            else:
                self._holders.setdefault(h, set()).add(url)
                self._by_url.setdefault(url, set()).add(h)
            lru[key] = weight
            self._weighted = self._weighted or weight != 1.0
        self._trim()

    def _trim(self) -> None:
        lru = self._lru
        while len(lru) > self.max_entries:
            self._drop(*lru.popitem(last=False)[0])

    def release(self, url: str, hashes: Iterable[int]) -> None:
        """`url` no longer holds these blocks."""
        for h in hashes:
            if self._lru.pop((h, url), None) is not None:
                self._drop(h, url)

    def replace(self, url: str, hashes: Iterable[int]) -> None:
        """What `url` holds is exactly `hashes` now (a report from the replica itself)."""
        self.forget(url)
        self.insert(url, hashes)

    def matched_blocks(self, hashes: Sequence[int]) -> dict[str, float]:
        """For each replica that holds the first block: how many leading blocks it holds (each
        counted at its weight)."""
        if not hashes:
            return {}
        alive = set(self._holders.get(hashes[0], ()))
        if self._weighted:
            return self._weighted_run(hashes, alive)
        depth: dict[str, float] = {}
        for i, h in enumerate(hashes[1:], start=1):
            if not alive:
                break
            still = alive & self._holders.get(h, set())
            for url in alive - still:
                depth[url] = i
            alive = still
        depth.update(dict.fromkeys(alive, len(hashes)))
        return depth

    def _weighted_run(self, hashes: Sequence[int], alive: set[str]) -> dict[str, float]:
        lru = self._lru
        depth = dict.fromkeys(alive, 0.0)
        for h in hashes:
            if not alive:
                break
            alive = alive & self._holders.get(h, set())
            for url in alive:
                depth[url] += lru[(h, url)]
        return depth

    def forget(self, url: str) -> None:
        for h in self._by_url.pop(url, set()):
            del self._lru[(h, url)]
            self._unhold(h, url)

    def forget_all_but(self, urls: Iterable[str]) -> None:
        for url in set(self._by_url) - set(urls):
            self.forget(url)

    def urls(self) -> set[str]:
        return set(self._by_url)

    def _drop(self, h: int, url: str) -> None:
        held = self._by_url[url]
        held.discard(h)
        if not held:
            del self._by_url[url]
        self._unhold(h, url)

    def _unhold(self, h: int, url: str) -> None:
        holders = self._holders[h]
        holders.discard(url)
        if not holders:
            del self._holders[h]
