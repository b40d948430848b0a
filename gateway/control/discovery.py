"""DNS discovery: one task re-resolves `discovery.dns` every interval_s and hands the pool the
replica list, so new addresses get traffic and vanished ones drain (pool.update).

It is the shape of a Kubernetes headless Service: one A (or AAAA) record per ready pod, every
pod on the same port. When configured, discovery owns the replica list (Live.discovered;
a config reload keeps it). A failed or empty answer is counted and keeps the last good list: a
DNS hiccup never empties the pool; it is logged once when the rounds start failing (and again
after a good one), not every round. Each round's result goes to `on_round` (the metrics count
it); the metrics of replicas that leave the pool follow the pool's own signal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gateway.config import Discovery
from gateway.control.fetch import PollFailures
from gateway.pool.live import Live

if TYPE_CHECKING:
    import dns.asyncresolver

log = logging.getLogger(__name__)

Resolve = Callable[[Discovery], Awaitable[list[str]]]


class DiscoveryError(Exception):
    pass


def _resolver(spec: Discovery) -> dns.asyncresolver.Resolver:
    import dns.asyncresolver  # only when discovery is configured: ~0.1 s off every start

    # configure=True reads /etc/resolv.conf (nameservers, search list, ndots) on every round,
    # so a changed resolver configuration is picked up like a changed record.
    resolver = dns.asyncresolver.Resolver(configure=spec.nameserver is None)
    if spec.nameserver is not None:
        host, _, port = spec.nameserver.rpartition(":")
        resolver.nameservers = [host.strip("[]")]
        resolver.port = int(port)
    resolver.lifetime = spec.timeout_s
    return resolver


async def _query(resolver: dns.asyncresolver.Resolver, name: str, kind: str) -> list[str]:
    import dns.resolver

    try:
        answer = await resolver.resolve(name, kind, search=True)
    except dns.resolver.NoAnswer:
        return []  # the name exists, with no record of this type (an IPv4-only Service's AAAA)
    return [record.to_text() for record in answer]


async def resolve_addresses(spec: Discovery) -> list[str]:
    """Every A and AAAA address of spec.dns; raises DiscoveryError when neither lookup worked."""
    try:
        resolver = _resolver(spec)
    except Exception as exc:  # e.g. no /etc/resolv.conf
        raise DiscoveryError(f"no resolver for {spec.dns}: {exc}") from exc
    results = await asyncio.gather(
        *(_query(resolver, spec.dns, kind) for kind in ("A", "AAAA")), return_exceptions=True
    )
    addresses = [a for result in results if isinstance(result, list) for a in result]
    # Any failure (timeout, SERVFAIL, NXDOMAIN, a socket error) is a failed round, never a crash
    # of the discovery task.
    errors = [r for r in results if isinstance(r, BaseException)]
    if len(errors) == len(results):
        raise DiscoveryError(f"cannot resolve {spec.dns}: {errors[0]}")
    if not addresses:
        raise DiscoveryError(f"{spec.dns} has no A or AAAA record")
    return addresses


def replica_url(spec: Discovery, address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{spec.scheme}://{host}:{spec.port}"


class DnsDiscovery:
    def __init__(
        self,
        live: Live,
        resolve: Resolve = resolve_addresses,
        on_round: Callable[[str], None] = lambda result: None,
    ) -> None:
        self._live = live
        self._resolve = resolve
        self._on_round = on_round
        self._failures = PollFailures(log, "discovery", "keeping the last list of replicas")

    async def run(self) -> None:
        while True:
            spec = self._live.runtime.config.discovery
            if spec is None:
                # Discovery may be switched on by a reload; look again at the reload cadence.
                await asyncio.sleep(self._live.runtime.config.reload.poll_interval_s)
                continue
            await self.refresh(spec)
            await asyncio.sleep(spec.interval_s)

    async def refresh(self, spec: Discovery) -> None:
        result = "ok"
        try:
            addresses = await self._resolve(spec)
        except DiscoveryError as exc:
            result = "error"
            self._failures.failed(spec.dns, exc)
        else:
            self._failures.ok(spec.dns)
            if self._live.runtime.config.discovery == spec:  # not reconfigured meanwhile
                self._apply(tuple(sorted({replica_url(spec, a) for a in addresses})))
        self._on_round(result)

    def _apply(self, urls: tuple[str, ...]) -> None:
        before = set(self._live.discovered or ())
        if urls == self._live.discovered:
            return
        self._live.discovered = urls
        self._live.pool.update(urls)
        added, gone = sorted(set(urls) - before), sorted(before - set(urls))
        log.info("discovery: %d replicas (added %s, draining %s)", len(urls), added, gone)
