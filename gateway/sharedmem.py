"""A named shared-memory segment for a gateway's workers (`workers: N`): the replica counts
(gateway/pool/shared.py) and the keys' limits (gateway/flow/buckets_shared.py) live in one each.
"""

from __future__ import annotations

from multiprocessing import resource_tracker, shared_memory


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
