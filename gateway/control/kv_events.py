"""KV cache events, for `precise_prefix` on real engines: the gateway follows what each
replica's engine says it stores and evicts, as vLLM and SGLang publish it over ZeroMQ
(`--kv-events-config`), and our replica too (replica/kv_events.py), so one path serves every
engine. The wire is decoded by gateway/control/kv_wire.py.

One follower per replica and data-parallel rank SUBscribes (connects) to the replica's
publisher: `routing.prefix.events.port` (+ the rank) on the replica URL's host, or the
replica's own `kv_events` endpoints. Each batch carries a sequence number, +1 per batch, from
0 when the engine starts. A follower keeps the number it expects next:
- on connecting, it asks the replay endpoint (a DEALER to the engine's ROUTER) for every batch
  the engine keeps, from 0, and applies them (live batches sent meanwhile are not applied
  twice); a batch past a gap asks for the missing ones; without a replay endpoint, what was
  missed stays unknown (after a gap, what the follower held of that rank is dropped: a missed
  eviction would otherwise be believed forever);
- a number lower than expected is an engine restart: what it held of that rank is dropped,
  and what the new engine published before is replayed;
- a dropped connection (the engine stopped, or the network) drops what it held of that rank
  at once (an idle restarted engine may not publish for a long time); reconnecting replays.
Undecodable messages and malformed events are counted and dropped, never applied.

Blocks are keyed by the gateway's own chained hash of their token ids (gateway/routing/prefix
.py), never by the engine's hash: engines hash differently (vLLM's default is a per-process
random seed; bytes or ints), while the gateway hashes a prompt's tokens the same way for every
replica. Each rank keeps engine hash -> own key, to chain a stored block to its parent and to
know what a removal removes. A block stored under a LoRA adapter chains from a seed of the
adapter's name, and one with extra keys (images, a cache salt) from a digest of them, so a
plain prompt never matches them. Only the main (full) attention group is followed; a block of
another `block_size` than the gateway's is not comparable and is counted and skipped. A block
the engine keeps off the GPU (`medium` other than GPU: host memory, disk) counts
`events.cpu_weight` of one on the GPU. Each rank keeps at most `prefix.max_entries` blocks.

What a replica holds (all its ranks together) is handed to every policy that needs
cache_blocks (`on_cache`, changes only), and all of it again to a policy that a reload made
new or for a replica that comes back into rotation (the policy forgot it when it left). The
followers run off the request path: receiving never blocks the event loop, and a follower
yields to it every few messages however fast a publisher sends.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgpack  # type: ignore[import-untyped]
import zmq
import zmq.asyncio
from yarl import URL
from zmq.utils.monitor import parse_monitor_message

from gateway.config.schema import ReplicaEvents
from gateway.control import kv_wire
from gateway.errors import clipped
from gateway.pool.live import Live, Runtime
from gateway.routing.base import Policy
from gateway.routing.options import KvEventsOptions
from gateway.routing.prefix import chain

log = logging.getLogger(__name__)

RECONCILE_S = 1.0  # how often the followers are matched to the pool and the config
YIELD_EVERY = 32  # messages a follower handles before it lets the event loop run others
GPU, OTHER = 0, 1  # tiers: the engine's own memory, and anything slower
# vLLM's kv_cache_spec_kind of the groups whose blocks hold a prefix's whole attention.
MAIN_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})
RCVHWM = 1000  # batches waiting in a follower's socket (each at most max_message_bytes)
YIELD_EVERY_BLOCKS = 1024  # blocks applied before a follower lets the event loop run others


class FeedEvents:
    """What the feed reports (the gateway's metrics implement it; here, nothing).
    `what`: batches, gaps, replays, replays_failed, restarts, disconnects, resyncs, decode_errors,
    rejected_events, orphan_blocks, foreign_blocks, dropped_blocks."""

    def counted(self, replica: str, what: str, n: int = 1) -> None:
        """`n` more of `what` at this replica."""


@dataclass(frozen=True)
class Target:
    """One publisher: a replica's rank, where it publishes and replays."""

    url: str
    rank: int
    endpoint: str
    replay: str | None
    topic: str = ""
    max_message_bytes: int = 4 * 1024 * 1024


def targets(
    urls: Iterable[str], options: KvEventsOptions, own: dict[str, ReplicaEvents | None]
) -> dict[tuple[str, int], Target]:
    """Every publisher of these replicas: ranks 0..data_parallel_size-1 of each."""
    found = {}
    for url in urls:
        spec = own.get(url)
        for rank in range(options.data_parallel_size):
            if spec is not None:
                endpoint, replay = spec.endpoint, spec.replay_endpoint
            else:
                host = URL(url).host or "127.0.0.1"
                host = f"[{host}]" if ":" in host else host
                endpoint = f"tcp://{host}:{options.port}"
                replay = f"tcp://{host}:{options.replay_port}" if options.replay_port else None
            found[(url, rank)] = Target(
                url,
                rank,
                offset(endpoint, rank),
                offset(replay, rank) if replay else None,
                options.topic,
                options.max_message_bytes,
            )
    return found


def offset(endpoint: str, rank: int) -> str:
    """The endpoint of data-parallel rank `rank`, as the engines offset it: a tcp port + rank,
    an ipc path + `_dp<rank>`."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"


def seed_of(lora_name: str | None) -> int:
    """The chain's start: 0, as for a prompt, or a digest of the LoRA adapter's name."""
    if not lora_name:
        return 0
    digest = hashlib.blake2b(b"lora\0" + lora_name.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def salted(parent: int, extra: object) -> int | None:
    """A block's key moved off the plain chain by its extra keys (images, a cache salt); None
    when they cannot be encoded (then the block cannot be keyed)."""
    try:
        encoded = msgpack.packb(extra, use_bin_type=True)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return None
    data = parent.to_bytes(8, "little") + encoded
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"extra").digest(), "little")


@dataclass(slots=True)
class _Block:
    """A block one publisher holds: our key for it and how many stores per tier (an engine may
    store a block twice, one copy per tier, or twice in one through a connector)."""

    key: int
    copies: list[int] = field(default_factory=lambda: [0, 0])  # [gpu, other]


@dataclass
class _Rank:
    """What one publisher holds, by engine hash."""

    blocks: dict[kv_wire.Hash, _Block] = field(default_factory=dict)
    group: int | None = None  # the main attention group's index, once a store names it


class _Replica:
    """What one replica holds across its ranks: own key -> copies per tier."""

    def __init__(self) -> None:
        self.copies: dict[int, list[int]] = {}

    def add(self, key: int, tier: int, n: int) -> None:
        counts = self.copies.setdefault(key, [0, 0])
        counts[tier] += n
        if counts[0] <= 0 and counts[1] <= 0:
            del self.copies[key]

    def weight(self, key: int, cpu_weight: float) -> float | None:
        counts = self.copies.get(key)
        if counts is None:
            return None
        return 1.0 if counts[GPU] > 0 else cpu_weight


class Follower:
    """One publisher's stream, applied in order (see the module's docstring)."""

    def __init__(self, feed: KvEventsFeed, target: Target) -> None:
        self.feed = feed
        self.target = target
        self.rank = _Rank()
        self.expected: int | None = None  # the next sequence number; None: not connected yet
        self.replayed_to: int | None = None  # a replay on connecting applied the seqs below
        self.lag_s = math.nan  # now - the last batch's timestamp

    async def run(self) -> None:
        sub = self.feed.context.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, RCVHWM)
            sub.setsockopt(zmq.HEARTBEAT_IVL, 5000)  # a peer that vanished without a reset
            sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)  # ... counts as disconnected
            sub.setsockopt(zmq.MAXMSGSIZE, self.target.max_message_bytes)
            sub.setsockopt(zmq.IPV6, 1)
            sub.setsockopt(zmq.RECONNECT_IVL, 100)
            sub.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            sub.setsockopt(zmq.SUBSCRIBE, self.target.topic.encode())
            monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            poller = zmq.asyncio.Poller()
            poller.register(monitor, zmq.POLLIN)
            poller.register(sub, zmq.POLLIN)
            sub.connect(self.target.endpoint)
            handled = 0
            while True:  # one task: connection news and batches are applied in order
                ready = dict(await poller.poll())
                if monitor in ready:
                    event = parse_monitor_message(await monitor.recv_multipart())
                    await self._connection(event["event"], sub)
                elif sub in ready:
                    await self.receive(await sub.recv_multipart())
                handled += 1
                if handled % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        finally:
            if "monitor" in locals():
                sub.disable_monitor()
                monitor.close(linger=0)
            sub.close(linger=0)

    async def _connection(self, event: int, sub: zmq.asyncio.Socket) -> None:
        """Connected: what the engine keeps is replayed now, not at its next batch (an idle
        engine may not publish for a long time). Disconnected: the engine stopped, or the
        network did; what it held is dropped now (a restarted engine starts empty)."""
        url, count = self.target.url, self.feed.events.counted
        if event == zmq.EVENT_DISCONNECTED:
            count(url, "disconnects")
            while int(sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:  # the gone engine's batches
                await sub.recv_multipart()  # still queued: moot now
            self.clear()
            self.expected, self.replayed_to = None, None
        elif event == zmq.EVENT_CONNECTED and self.expected is None:
            replayed = await self._replay(0, 2**64)
            for _, payload in replayed or ():
                await self.apply(payload)
                await asyncio.sleep(0)  # a long history lets the event loop run others
            if replayed:
                self.expected = self.replayed_to = replayed[-1][0] + 1

    async def receive(self, frames: list[bytes]) -> None:
        try:
            _topic, seq, payload = kv_wire.message(frames)
        except kv_wire.WireError:
            self.feed.events.counted(self.target.url, "decode_errors")
            return
        expected, replayed_to = self.expected, self.replayed_to
        self.replayed_to = None
        if replayed_to is not None and seq < replayed_to:
            self.replayed_to = replayed_to
            return  # sent live while it was being replayed: applied already
        if expected is None or seq != expected:
            await self._catch_up(expected, seq)
        self.expected = seq + 1
        await self.apply(payload)

    async def _catch_up(self, expected: int | None, seq: int) -> None:
        """Batch `seq` arrived where `expected` was next: replay what came before it."""
        url, count = self.target.url, self.feed.events.counted
        if expected is not None and seq < expected:  # numbers start over: a new engine
            count(url, "restarts")
            self.clear()
            start = 0
        elif expected is not None:
            count(url, "gaps")
            start = expected
        else:
            start = 0  # just connected: the engine's history, as far as it keeps it
        if start >= seq:
            return
        replayed = await self._replay(start, seq) or []
        complete = [seq for seq, _ in replayed] == list(range(start, seq))
        if not complete and expected is not None and seq > expected:
            count(url, "resyncs")  # events lost: an eviction missed would be believed forever
            self.clear()
        for _, payload in replayed:
            await self.apply(payload)
            await asyncio.sleep(0)

    async def _replay(self, start: int, until: int) -> list[tuple[int, bytes]] | None:
        """The batches from `start` up to `until` (excluded) the engine still keeps, in order;
        None when it cannot be asked (no replay endpoint, no answer in time)."""
        if self.target.replay is None:
            return None
        url, count = self.target.url, self.feed.events.counted
        options = self.feed.options
        dealer = self.feed.context.socket(zmq.DEALER)
        got: list[tuple[int, bytes]] = []
        try:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.MAXMSGSIZE, self.target.max_message_bytes)
            dealer.setsockopt(zmq.IPV6, 1)
            dealer.connect(self.target.replay)
            async with asyncio.timeout(options.replay_timeout_s):
                await dealer.send_multipart(kv_wire.replay_request(start))
                while len(got) < until - start:
                    frames = await dealer.recv_multipart()
                    try:
                        reply = kv_wire.replay_reply(frames)
                    except kv_wire.WireError:
                        count(url, "decode_errors")
                        continue
                    if reply is None:
                        break
                    if start <= reply[0] < until and (not got or reply[0] > got[-1][0]):
                        got.append(reply)
                    elif reply[0] >= until:
                        break
        except TimeoutError:
            count(url, "replays_failed")
            log.warning(
                "kv events: %s gave no replay from %d within %.1f s",
                self.target.replay,
                start,
                options.replay_timeout_s,
            )
            return None
        finally:
            dealer.close(linger=0)
        count(url, "replays")
        return got

    async def apply(self, payload: bytes) -> None:
        url, count = self.target.url, self.feed.events.counted
        try:
            batch = kv_wire.decode(payload, self.feed.options.engine)
        except kv_wire.WireError as exc:
            count(url, "decode_errors")
            self.feed.warn_once(url, "undecodable", f"an undecodable batch ({clipped(str(exc))})")
            return
        count(url, "batches")
        if batch.rejected:
            count(url, "rejected_events", len(batch.rejected))
            self.feed.warn_once(
                url, "malformed", f"a malformed event ({clipped(batch.rejected[0])})"
            )
        if math.isfinite(batch.ts):
            self.lag_s = time.time() - batch.ts
        touched: set[int] = set()
        work = 0
        for event in batch.events:
            try:
                if isinstance(event, kv_wire.Stored):
                    self._stored(event, touched)
                elif isinstance(event, kv_wire.Removed):
                    self._removed(event, touched)
                else:
                    touched |= self._clear()
            except Exception as exc:  # a case this code did not foresee: that event only
                count(url, "apply_errors")
                self.feed.warn_once(url, "apply", f"an event it failed on ({exc!r})")
            work += 1 + len(getattr(event, "block_hashes", ()))
            if work >= YIELD_EVERY_BLOCKS:  # a big batch lets the event loop run others
                work = 0
                await asyncio.sleep(0)
        self.feed.changed(url, touched)

    def clear(self) -> None:
        self.feed.changed(self.target.url, self._clear())

    def _clear(self) -> set[int]:
        replica = self.feed.replica(self.target.url)
        for block in self.rank.blocks.values():
            for tier in (GPU, OTHER):
                if block.copies[tier]:
                    replica.add(block.key, tier, -block.copies[tier])
        touched = {block.key for block in self.rank.blocks.values()}
        self.rank = _Rank()
        return touched

    def _stored(self, event: kv_wire.Stored, touched: set[int]) -> None:
        url, count = self.target.url, self.feed.events.counted
        blocks = len(event.block_hashes)
        block_size = self.feed.block_size
        if not self._main_group(event.kind, event.group_idx):
            count(url, "other_group_blocks", blocks)  # sliding window ...: the main one decides
            return
        if event.block_size != block_size:
            count(url, "foreign_blocks", blocks)
            self.feed.warn_once(
                url, "block size", f"blocks of {event.block_size} tokens (ours: {block_size})"
            )
            return
        rank = self.rank
        if event.parent is None:
            adapter = event.lora_name or (f"#{event.lora_id}" if event.lora_id else None)
            parent: int | None = seed_of(adapter)
        else:
            stored = rank.blocks.get(event.parent)
            parent = stored.key if stored is not None else None
        if parent is None:  # its parent's store was missed: it cannot be chained
            count(url, "orphan_blocks", blocks)
            return
        tier = GPU if event.medium == kv_wire.TIER_GPU else OTHER
        replica = self.feed.replica(url)
        extra = event.extra_keys or ()
        for i, engine_hash in enumerate(event.block_hashes):
            ids = event.token_ids[i * block_size : (i + 1) * block_size]
            key = chain(ids, block_size, parent)[0]
            if i < len(extra) and extra[i] is not None:
                moved = salted(key, extra[i])
                if moved is None:
                    count(url, "orphan_blocks", blocks - i)
                    return
                key = moved
            block = rank.blocks.get(engine_hash)
            if block is None:
                if len(rank.blocks) >= self.feed.max_blocks:
                    count(url, "dropped_blocks", blocks - i)
                    return
                block = rank.blocks[engine_hash] = _Block(key)
            parent = block.key  # the first store's key names it
            block.copies[tier] += 1
            replica.add(block.key, tier, 1)
            touched.add(block.key)

    def _main_group(self, kind: str | None, group: int | None) -> bool:
        """A store of the main (full) attention group; the first one names its group index."""
        main = group in (None, 0) if kind is None else kind in MAIN_KINDS
        if main and group is not None and self.rank.group is None:
            self.rank.group = group
        return main and (group is None or self.rank.group in (None, group))

    def _removed(self, event: kv_wire.Removed, touched: set[int]) -> None:
        rank, replica = self.rank, self.feed.replica(self.target.url)
        if event.group_idx is not None and rank.group not in (None, event.group_idx):
            return  # evicted from another group (the same hash is stored in every group)
        tier = GPU if event.medium == kv_wire.TIER_GPU else OTHER
        for engine_hash in event.block_hashes:
            block = rank.blocks.get(engine_hash)
            if block is None or block.copies[tier] == 0:
                continue  # stored before we listened, or in another tier
            block.copies[tier] -= 1
            replica.add(block.key, tier, -1)
            touched.add(block.key)
            if block.copies[GPU] == 0 and block.copies[OTHER] == 0:
                del rank.blocks[engine_hash]


class KvEventsFeed:
    """The followers of every replica's publishers, kept in step with the pool and the config
    (`run`), and what they learn handed to the policies."""

    def __init__(self, live: Live, events: FeedEvents | None = None) -> None:
        self.live = live
        self.events = events or FeedEvents()
        self._context: zmq.asyncio.Context | None = None  # made for the first follower
        self.followers: dict[tuple[str, int], tuple[Follower, asyncio.Task[None]]] = {}
        self._replicas: dict[str, _Replica] = {}
        self._fed = self._policies(live.runtime)  # the policies told so far
        self._active = {replica.url for replica in live.pool.active()}
        self._warned: set[tuple[str, str]] = set()
        live.swapped.append(self._swapped)
        live.pool.changed.append(self._pool_changed)

    @property
    def context(self) -> zmq.asyncio.Context:
        """The ZeroMQ context of the followers' sockets; none in a gateway that follows none."""
        if self._context is None:
            self._context = zmq.asyncio.Context()
        return self._context

    @property
    def options(self) -> KvEventsOptions:
        return self.live.runtime.options.prefix.events or KvEventsOptions()

    @property
    def block_size(self) -> int:
        return self.live.runtime.options.prefix.block_size

    @property
    def max_blocks(self) -> int:
        return self.live.runtime.options.prefix.max_entries

    def replica(self, url: str) -> _Replica:
        return self._replicas.setdefault(url, _Replica())

    def held(self, url: str) -> int:
        """Blocks this gateway knows the replica holds, every tier and rank together."""
        replica = self._replicas.get(url)
        return len(replica.copies) if replica is not None else 0

    def lag_s(self, url: str) -> float:
        """Seconds from the newest batch's timestamp to its arrival, its ranks' worst."""
        lags = [f.lag_s for (u, _), (f, _) in self.followers.items() if u == url]
        return max((lag for lag in lags if math.isfinite(lag)), default=math.nan)

    async def run(self) -> None:
        try:
            while True:
                self.reconcile()
                await asyncio.sleep(RECONCILE_S)
        finally:
            for _, task in self.followers.values():
                task.cancel()
            tasks = [task for _, task in self.followers.values()]
            await asyncio.gather(*tasks, return_exceptions=True)
            self.followers.clear()
            if self._context is not None:
                self._context.destroy(linger=0)

    def reconcile(self) -> None:
        """Follow exactly the publishers the config and the pool name now."""
        runtime = self.live.runtime
        wanted: dict[tuple[str, int], Target] = {}
        events = runtime.options.prefix.events
        if events is not None and self._policies(runtime):
            urls = [replica.url for replica in self.live.pool.all()]
            wanted = targets(urls, events, runtime.config.replica_events)
        for key, (follower, task) in list(self.followers.items()):
            if wanted.get(key) != follower.target or task.done():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error("kv events: following %s failed", key[0], exc_info=task.exception())
                task.cancel()
                follower.clear()
                del self.followers[key]
        for key, target in wanted.items():
            if key not in self.followers:
                follower = Follower(self, target)
                task = asyncio.create_task(follower.run(), name=f"kv-events {target.endpoint}")
                self.followers[key] = (follower, task)
        for url in set(self._replicas) - {url for url, _ in wanted}:
            self.changed(url, set(self._replicas.pop(url).copies))

    def changed(self, url: str, keys: set[int]) -> None:
        """Tell the policies what became of these blocks at `url`."""
        if not keys:
            return
        cpu_weight = self.options.cpu_weight
        replica = self._replicas.get(url) or _Replica()
        held: dict[int, float] = {}
        dropped = []
        for key in keys:
            weight = replica.weight(key, cpu_weight)
            if weight is None:
                dropped.append(key)
            else:
                held[key] = weight
        for policy in self._policies(self.live.runtime):
            policy.on_cache(url, held, dropped)

    def warn_once(self, url: str, category: str, what: str) -> None:
        """One log line per replica and kind of trouble (`what`: this time's details)."""
        if (url, category) not in self._warned:
            self._warned.add((url, category))
            log.warning("kv events: %s published %s; counted and skipped", url, what)

    def _snapshot(self, policies: Iterable[Policy], urls: Iterable[str]) -> None:
        cpu_weight = self.options.cpu_weight
        for url in urls:
            replica = self._replicas.get(url)
            if replica is None:
                continue
            held = {key: replica.weight(key, cpu_weight) or 0.0 for key in replica.copies}
            for policy in policies:
                policy.on_cache(url, held, replace=True)

    def _swapped(self, runtime: Runtime) -> None:
        policies = self._policies(runtime)
        new = [p for p in policies if not any(p is fed for fed in self._fed)]
        self._fed = policies
        self._snapshot(new, list(self._replicas))

    def _pool_changed(self) -> None:
        active = {replica.url for replica in self.live.pool.active()}
        back, self._active = active - self._active, active
        self._snapshot(self._fed, back)

    @staticmethod
    def _policies(runtime: Runtime) -> list[Policy]:
        every = [runtime.policy, *runtime.model_policies.values()]
        return [p for p in _unique(every) if "cache_blocks" in p.needs]


def _unique(policies: Iterable[Policy]) -> Iterator[Policy]:
    seen: list[Policy] = []
    for policy in policies:
        if not any(policy is s for s in seen):
            seen.append(policy)
            yield policy
