"""Strategy `precise_prefix`: every `routing.prefix.poll_interval_s`, GET /cache/blocks on each
replica and hand its block hashes to the policy, which replaces what it knew of that replica.

A report counts only when the replica hashes as the gateway does (the same `hash_scheme`,
`tokenizer` and `block_size`); otherwise, or when the poll fails, the replica is taken to hold
nothing (a replica without a prefix cache answers 400 or 404). Reports are read with a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp

from gateway.policies import PrecisePrefix
from gateway.pool import Replica
from gateway.prefix import HASH_SCHEME, TOKENIZER
from gateway.runtime import GatewayState
from gateway.upstream import BodyOverLimit, read_capped

log = logging.getLogger("gateway")
MAX_REPORT_BYTES = 8 * 1024 * 1024  # 16 hex digits + 3 per block: ~440k blocks


class CacheBlocksPoller:
    def __init__(self, state: GatewayState) -> None:
        self._state = state
        self._warned: set[str] = set()

    async def run(self) -> None:
        while True:
            runtime = self._state.runtime
            polled = [(None, runtime.policy), *runtime.model_policies.items()]
            precise = [(p, model) for model, p in polled if isinstance(p, PrecisePrefix)]
            if precise:
                block_size = runtime.options.prefix.block_size
                await asyncio.gather(*(self.poll_once(p, block_size, m) for p, m in precise))
                await asyncio.sleep(runtime.options.prefix.poll_interval_s)
            else:  # the strategy may be switched on by a reload
                await asyncio.sleep(runtime.config.reload.poll_interval_s)

    async def poll_once(
        self, policy: PrecisePrefix, block_size: int, model: str | None = None
    ) -> None:
        """Every replica's blocks of `model` (its default model when None)."""
        replicas = [r for r in self._state.pool.active() if r.serves(model)]
        reports = await asyncio.gather(*(self._read(r, block_size, model) for r in replicas))
        for replica, hashes in zip(replicas, reports, strict=True):
            policy.report(replica.url, hashes)

    async def _read(self, replica: Replica, block_size: int, model: str | None) -> list[int]:
        session = self._state.client()
        limit = aiohttp.ClientTimeout(total=2.0)
        failures = (aiohttp.ClientError, TimeoutError, ValueError, TypeError, BodyOverLimit)
        query = {"model": model} if model is not None else None
        with contextlib.suppress(*failures):
            url = f"{replica.url}/cache/blocks"
            async with session.get(url, params=query, timeout=limit) as response:
                if response.status != 200:
                    return []
                report = json.loads(await read_capped(response, MAX_REPORT_BYTES))
                if self._comparable(replica, report, block_size):
                    return [int(h, 16) for h in report["blocks"]]
        return []

    def _comparable(self, replica: Replica, report: Any, block_size: int) -> bool:
        expected = {"hash_scheme": HASH_SCHEME, "tokenizer": TOKENIZER, "block_size": block_size}
        if not isinstance(report, dict) or not isinstance(report.get("blocks"), list):
            return False
        differ = {k: report.get(k) for k, v in expected.items() if report.get(k) != v}
        if differ and replica.url not in self._warned:
            self._warned.add(replica.url)
            log.warning(
                "precise_prefix: %s hashes its cache differently (%s); its reports are ignored",
                replica.url,
                ", ".join(f"{k}={v!r}" for k, v in differ.items()),
            )
        return not differ
