"""Hot reload: parse, validate, build a new runtime, swap one reference; all on the event loop.

Triggers: the config file's mtime changing (polled), SIGHUP, and POST /admin/reload. An invalid
file is refused, logged with its key path and counted; the old config keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.runtime import GatewayState, Runtime, build_runtime

log = logging.getLogger(__name__)

FileSignature = tuple[int, int, int] | None


def file_signature(path: os.PathLike[str] | str) -> FileSignature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def reload_config(state: GatewayState, trigger: str) -> Runtime:
    """Load the config file again and swap it in; raises ConfigError and keeps the old one."""
    if state.config_path is None:
        raise ConfigError("this gateway was started without a config file; nothing to reload")
    try:
        config = load_config(state.config_path)
    except ConfigError as exc:
        state.metrics.reloads.labels("error").inc()
        log.error("config reload (%s) refused, previous config still serving: %s", trigger, exc)
        raise
    old = state.runtime.config
    for key, before, after in (
        ("listen", old.listen, config.listen),
        ("limits.max_header_bytes", old.limits.max_header_bytes, config.limits.max_header_bytes),
        ("limits.client_keepalive_s", old.limits.client_keepalive_s,
         config.limits.client_keepalive_s),
        ("limits.max_connections", old.limits.max_connections, config.limits.max_connections),
        ("jobs", old.jobs, config.jobs),
    ):  # fmt: skip
        if before != after:
            log.warning("config reload (%s): '%s' changes take effect on restart", trigger, key)
    state.swap(build_runtime(config, state.runtime))
    state.metrics.reloads.labels("ok").inc()
    log.info(
        "config reloaded (%s): strategy %s, %d replicas",
        trigger,
        config.routing.strategy,
        len(state.pool.active()),
    )
    return state.runtime


class ReloadWatcher:
    """The one task that reloads: on a changed file signature or when woken (SIGHUP)."""

    def __init__(self, state: GatewayState) -> None:
        self._state = state
        self._wake = asyncio.Event()
        path = state.config_path
        self._seen = file_signature(path) if path is not None else None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        path = self._state.config_path
        if path is None:
            return
        while True:
            settings = self._state.runtime.config.reload
            try:
                await asyncio.wait_for(self._wake.wait(), settings.poll_interval_s)
                trigger = "signal"
            except TimeoutError:
                trigger = "file change"
            self._wake.clear()
            signature = file_signature(path)
            if trigger == "file change" and (not settings.watch or signature == self._seen):
                continue
            self._seen = signature
            try:
                reload_config(self._state, trigger)
            except ConfigError:
                if file_signature(path) != signature:
                    self._seen = None  # the file was being written as we read it: look again
