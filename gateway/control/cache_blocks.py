"""Cache blocks, for the policies that need them (`precise_prefix`): every
`routing.prefix.poll_interval_s`, GET /cache/blocks on each replica, handed to the policy
(`on_report`), which replaces what it knew of that replica.

A report counts only when the replica hashes as the gateway does (the same `hash_scheme`,
`tokenizer` and `block_size`); otherwise, or when the poll fails, the replica is taken to hold
nothing (a replica without a prefix cache answers 400 or 404). Reports are read with a cap and
a timeout of one poll interval (at most 2 s); a replica's failed poll costs its own report
only, and one log line when its polls start failing. A block is 16 lowercase hex digits, as our
replica writes it; a report with anything else is not used.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import aiohttp

from gateway.control.fetch import POLL_FAILURES, PollFailures, Session, get_json
from gateway.errors import clipped
from gateway.pool.live import Live
from gateway.routing.policies import Policy
from gateway.routing.prefix import HASH_SCHEME, TOKENIZER
from gateway.routing.replica import Replica

log = logging.getLogger("gateway")
MAX_REPORT_BYTES = 8 * 1024 * 1024  # 16 hex digits + 3 per block: ~440k blocks
MAX_TIMEOUT_S = 2.0
_BLOCK = re.compile(r"[0-9a-f]{16}", re.ASCII)  # int(h, 16) alone takes '٣' and any length


class BadReport(ValueError):
    """A /cache/blocks answer that is JSON but not a list of block hashes."""


class CacheBlocksPoller:
    def __init__(self, live: Live, session: Session) -> None:
        self._live = live
        self._session = session
        self._warned: set[str] = set()
        self._failures = PollFailures(log, "precise_prefix", "it is taken to hold nothing")

    async def run(self) -> None:
        while True:
            runtime = self._live.runtime
            polled = [(None, runtime.policy), *runtime.model_policies.items()]
            precise = [(p, model) for model, p in polled if "cache_blocks" in p.needs]
            if precise:
                options = runtime.options.prefix
                limit = aiohttp.ClientTimeout(total=min(MAX_TIMEOUT_S, options.poll_interval_s))
                await asyncio.gather(
                    *(self.poll_once(p, options.block_size, m, limit) for p, m in precise)
                )
                await asyncio.sleep(options.poll_interval_s)
            else:  # the strategy may be switched on by a reload
                await asyncio.sleep(runtime.config.reload.poll_interval_s)

    async def poll_once(
        self,
        policy: Policy,
        block_size: int,
        model: str | None = None,
        limit: aiohttp.ClientTimeout | None = None,
    ) -> None:
        """Every replica's blocks of `model` (its default model when None)."""
        active = self._live.pool.active()
        replicas = [r for r in active if r.serves(model)]
        self._failures.keep({r.url for r in active})
        limit = limit or aiohttp.ClientTimeout(total=MAX_TIMEOUT_S)
        reports = await asyncio.gather(*(self._read(r, block_size, model, limit) for r in replicas))
        for replica, hashes in zip(replicas, reports, strict=True):
            policy.on_report(replica.url, hashes)

    async def _read(
        self, replica: Replica, block_size: int, model: str | None, limit: aiohttp.ClientTimeout
    ) -> list[int]:
        query = {"model": model} if model is not None else None
        url = f"{replica.url}/cache/blocks"
        try:
            status, report = await get_json(
                self._session(), url, max_bytes=MAX_REPORT_BYTES, limit=limit, params=query
            )
            hashes = blocks(report) if status == 200 else []
        except POLL_FAILURES as error:
            self._failures.failed(replica.url, error)
            return []
        self._failures.ok(replica.url)
        return hashes if self._comparable(replica, report, block_size) else []

    def _comparable(self, replica: Replica, report: Any, block_size: int) -> bool:
        expected = {"hash_scheme": HASH_SCHEME, "tokenizer": TOKENIZER, "block_size": block_size}
        if not isinstance(report, dict):
            return False
        differ = {k: report.get(k) for k, v in expected.items() if report.get(k) != v}
        if differ and replica.url not in self._warned:
            self._warned.add(replica.url)
            log.warning(
                "precise_prefix: %s hashes its cache differently (%s); its reports are ignored",
                replica.url,
                ", ".join(f"{k}={clipped(repr(v))}" for k, v in differ.items()),
            )
        return not differ


def blocks(report: Any) -> list[int]:
    """The block hashes of a /cache/blocks answer; BadReport when it holds something else."""
    listed = report.get("blocks") if isinstance(report, dict) else None
    if not isinstance(listed, list):
        raise BadReport("no list of blocks")
    if not all(isinstance(h, str) and _BLOCK.fullmatch(h) for h in listed):
        raise BadReport("a block that is not 16 lowercase hex digits")
    return [int(h, 16) for h in listed]
