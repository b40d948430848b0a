"""Cache blocks, for the policies that need them (`precise_prefix`): every
`routing.prefix.poll_interval_s`, GET /cache/blocks on each replica, handed to the policy
(`on_cache`), which replaces what it knew of that replica.

A report counts only when the replica hashes as the gateway does (the same `hash_scheme`,
`tokenizer` and `block_size`); otherwise, or when the poll fails, the replica is taken to hold
nothing (a replica without a prefix cache answers 400 or 404). Reports are read with a cap and
the clock of control/probe.py (poll_timeout); a replica's failed poll costs its own report
only, and one log line when its polls start failing. A block is 16 lowercase hex digits, as our
replica writes it; a report with anything else is not used.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from gateway.control.probe import Ask, Plan, Probe, ProbeAnswerError, poll_timeout
from gateway.errors import clipped
from gateway.pool.live import Live
from gateway.routing.prefix import HASH_SCHEME, TOKENIZER
from gateway.routing.replica import Replica

PATH = "/cache/blocks"
MAX_REPORT_BYTES = 8 * 1024 * 1024  # 16 hex digits + 3 per block: ~440k blocks
_BLOCK = re.compile(r"[0-9a-f]{16}", re.ASCII)  # int(h, 16) alone takes '٣' and any length
HASHING = ("hash_scheme", "tokenizer", "block_size")  # what must match the gateway's


class BadReport(ProbeAnswerError):
    """A /cache/blocks answer that is JSON but not a list of block hashes."""


@dataclass(frozen=True)
class CacheReport:
    hashes: list[int]
    hashing: dict[str, Any]  # HASHING's keys, as the replica says (None where it does not)


def blocks(report: Any) -> list[int]:
    """The block hashes of a /cache/blocks answer; BadReport when it holds something else."""
    listed = report.get("blocks") if isinstance(report, dict) else None
    if not isinstance(listed, list):
        raise BadReport("no list of blocks")
    if not all(isinstance(h, str) and _BLOCK.fullmatch(h) for h in listed):
        raise BadReport("a block that is not 16 lowercase hex digits")
    return [int(h, 16) for h in listed]


def read_blocks(status: int, body: bytes) -> CacheReport | None:
    """A replica's answer to GET /cache/blocks; None for an error status (no prefix cache).
    Malformed JSON raises ValueError (or RecursionError), anything but blocks BadReport."""
    if status != 200:
        return None
    report = json.loads(body)
    hashes = blocks(report)
    return CacheReport(hashes, {key: report.get(key) for key in HASHING})


class CacheBlocksProbe(Probe[CacheReport | None]):
    """Each replica's blocks of each model whose policy needs them (its default model for the
    gateway's default policy)."""

    name = "precise_prefix"
    consequence = "it is taken to hold nothing"
    log = logging.getLogger(__name__)

    def __init__(self, live: Live) -> None:
        self._live = live
        self._warned: set[str] = set()

    def plan(self) -> Plan[CacheReport | None] | None:
        runtime = self._live.runtime
        polled = [(None, runtime.policy), *runtime.model_policies.items()]
        models = [model for model, policy in polled if "cache_blocks" in policy.needs]
        if not models or runtime.options.prefix.events is not None:  # a reload may change it
            return None  # (with events, the feed in gateway/control/kv_events.py tells them)
        active = self._live.pool.active()
        asks = [Ask(r, PATH, model) for model in models for r in active if r.serves(model)]
        interval = runtime.options.prefix.poll_interval_s
        return Plan(asks, read_blocks, interval, poll_timeout(interval), MAX_REPORT_BYTES)

    def apply(self, ask: Ask, value: CacheReport | None) -> None:
        hashes = value.hashes if value is not None and self._comparable(ask.replica, value) else []
        self._report(ask, hashes)

    def failed(self, ask: Ask, error: Exception) -> None:
        self._report(ask, [])

    def keep(self, present: Collection[Replica]) -> None:
        self._warned.intersection_update(replica.url for replica in present)

    def _report(self, ask: Ask, hashes: list[int]) -> None:
        policy = self._live.runtime.policy_for(ask.model)
        policy.on_cache(ask.replica.url, dict.fromkeys(hashes, 1.0), replace=True)

    def _comparable(self, replica: Replica, report: CacheReport) -> bool:
        block_size = self._live.runtime.options.prefix.block_size
        expected = {"hash_scheme": HASH_SCHEME, "tokenizer": TOKENIZER, "block_size": block_size}
        differ = {k: report.hashing[k] for k, v in expected.items() if report.hashing[k] != v}
        if differ and replica.url not in self._warned:
            self._warned.add(replica.url)
            self.log.warning(
                "precise_prefix: %s hashes its cache differently (%s); its reports are ignored",
                replica.url,
                ", ".join(f"{k}={clipped(repr(v))}" for k, v in differ.items()),
            )
        return not differ
