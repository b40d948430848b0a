"""What the replicas' KV caches did during a benchmark run, as their KV cache events tell it
(replica/kv_events.py; vLLM's wire, decoded by gateway/control/kv_wire.py): the blocks each
replica stored and evicted, so a result shows whether its workload pressed the caches.

One background thread SUBscribes to every replica's publisher from `__enter__` to `__exit__`;
what was published before its subscriptions arrived is not counted (the run starts its load
after them).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import zmq

from gateway.control import kv_wire

POLL_MS = 100  # how soon the thread sees that it is asked to stop


class KvWatch:
    def __init__(self, endpoints: Sequence[str]) -> None:
        self._endpoints = list(endpoints)
        self.stored = [0] * len(endpoints)  # blocks, per replica
        self.removed = [0] * len(endpoints)
        self.undecodable = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-watch", daemon=True)

    def __enter__(self) -> KvWatch:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("kv watch: sockets not open after 10 s")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        context: zmq.Context[Any] = zmq.Context()
        subs: list[zmq.Socket[bytes]] = []
        try:
            poller = zmq.Poller()
            for endpoint in self._endpoints:
                sub: zmq.Socket[bytes] = context.socket(zmq.SUB)
                subs.append(sub)
                sub.setsockopt(zmq.LINGER, 0)
                sub.connect(endpoint)
                sub.subscribe(b"")
                poller.register(sub, zmq.POLLIN)
            self._ready.set()
            while not self._stop.is_set():
                for sub, _ in poller.poll(POLL_MS):
                    self._drain(subs.index(sub), sub)
        finally:
            self._ready.set()
            for sub in subs:
                sub.close()
            context.term()

    def _drain(self, replica: int, sub: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                batch = kv_wire.decode(kv_wire.message(frames)[2])
            except kv_wire.WireError:
                self.undecodable += 1
                continue
            for event in batch.events:
                if isinstance(event, kv_wire.Stored):
                    self.stored[replica] += len(event.block_hashes)
                elif isinstance(event, kv_wire.Removed):
                    self.removed[replica] += len(event.block_hashes)
