"""A named shared-memory segment for a gateway's workers (`workers: N`): the replica counts
(gateway/pool/shared.py), the keys' limits (gateway/flow/buckets_shared.py) and the tenants'
service (gateway/flow/service_shared.py) live in one each, each finding its entries by a 64-bit
hash of their names in an open-addressed table of such hashes (0 marks a free place).
"""

from __future__ import annotations

import hashlib
from multiprocessing import resource_tracker, shared_memory
from typing import Any


def segment(name: str, create: bool, size: int) -> shared_memory.SharedMemory:
    """The segment; only its creator (the supervisor, which unlinks it) registers it with the
    resource tracker. Python 3.11 registers on attach too (3.13's track=False), and a worker's
    tracker would then unlink the segment when that worker exits."""
    if create:
        return shared_memory.SharedMemory(name=name, create=True, size=size)
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def name_hash(name: str) -> int:
    """64 bits of a name (a replica URL, a key's, a tenant's), never 0 (0 marks a free place)."""
    value = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return value or 1


def claim(hashes: memoryview[Any], wanted: int) -> tuple[int, bool]:
    """The place of `wanted` in an open-addressed table of hashes that never frees a place:
    where it is, or the free place that ends its probe chain, now taken (then True: new);
    (-1, False) when every place holds another. The caller holds the table's lock."""
    size = len(hashes)
    start = wanted % size
    for step in range(size):
        place = (start + step) % size
        current = hashes[place]
        if current == wanted:
            return place, False
        if current == 0:
            hashes[place] = wanted
            return place, True
    return -1, False
