"""Hot reload: read, parse and validate the file in a worker thread (a large or hostile file
never stalls requests), then build a new runtime and swap one reference on the event loop.

Triggers: the config file's mtime changing (polled), SIGHUP, and POST /admin/reload. An invalid
file is refused, logged with its key path and counted; the old config keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from gateway.aio import wait_set
from gateway.app.state import AppState
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.pool.live import Runtime, build_runtime

log = logging.getLogger(__name__)

FileSignature = tuple[int, int, int] | None


def file_signature(path: os.PathLike[str] | str) -> FileSignature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def reload_config(state: AppState, trigger: str) -> Runtime:
    """Load the config file again and swap it in; raises ConfigError and keeps the old one.
    Parses on the calling thread: the event loop's callers use `reload_config_off_loop`."""
    path = _config_path(state)
    try:
        config = load_config(path)
    except ConfigError as exc:
        _refused(state, trigger, exc)
        raise
    return _swap(state, config, trigger)


async def reload_config_off_loop(state: AppState, trigger: str) -> Runtime:
    """As reload_config, the file read, parsed and validated in a worker thread; what touches
    the gateway's state (counting, the swap) runs back on the loop."""
    path = _config_path(state)
    try:
        config = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        _refused(state, trigger, exc)
        raise
    return _swap(state, config, trigger)


def _config_path(state: AppState) -> Path:
    if state.config_path is None:
        raise ConfigError("this gateway was started without a config file; nothing to reload")
    return state.config_path


def _refused(state: AppState, trigger: str, exc: ConfigError) -> None:
    state.metrics.reloads.labels("error").inc()
    log.error("config reload (%s) refused, previous config still serving: %s", trigger, exc)


def _swap(state: AppState, config: GatewayConfig, trigger: str) -> Runtime:
    old = state.live.runtime.config
    for key, before, after in (
        ("listen", old.listen, config.listen),
        ("limits.max_header_bytes", old.limits.max_header_bytes, config.limits.max_header_bytes),
        ("limits.client_keepalive_s", old.limits.client_keepalive_s,
         config.limits.client_keepalive_s),
        ("limits.max_connections", old.limits.max_connections, config.limits.max_connections),
        ("jobs", old.jobs, config.jobs),
        ("tracing", old.tracing, config.tracing),  # read at start-up (app/server.py _add_tracing)
    ):  # fmt: skip
        if before != after:
            log.warning("config reload (%s): '%s' changes take effect on restart", trigger, key)
    state.live.swap(build_runtime(config, state.live.runtime))
    state.metrics.reloads.labels("ok").inc()
    log.info(
        "config reloaded (%s): strategy %s, %d replicas",
        trigger,
        config.routing.strategy,
        len(state.live.pool.active()),
    )
    return state.live.runtime


class ReloadWatcher:
    """The one task that reloads: on a changed file signature or when woken (SIGHUP)."""

    def __init__(self, state: AppState) -> None:
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
            settings = self._state.live.runtime.config.reload
            woken = await wait_set(self._wake, settings.poll_interval_s)
            trigger = "signal" if woken else "file change"
            self._wake.clear()
            signature = file_signature(path)
            if trigger == "file change" and (not settings.watch or signature == self._seen):
                continue
            self._seen = signature
            try:
                await reload_config_off_loop(self._state, trigger)
            except ConfigError:
                if file_signature(path) != signature:
                    self._seen = None  # the file was being written as we read it: look again
