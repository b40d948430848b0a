"""The upstream leg shared by the proxy and the jobs scheduler: where a request goes on a replica,
the client timeouts it is sent with, which answers mean "try another replica", and bounded reads
of replica bodies the gateway holds in memory."""

from __future__ import annotations

import functools

import aiohttp
from yarl import URL

from gateway.config import Timeouts
from gateway.datapath.h1client import dot_segment

RETRIABLE_STATUSES = frozenset({429, 503})


@functools.lru_cache(maxsize=16)
def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    """sock_read bounds every silence from the replica, the wait for the headers included."""
    return aiohttp.ClientTimeout(
        total=timeouts.total_s, sock_connect=timeouts.connect_s, sock_read=timeouts.idle_s
    )


@functools.lru_cache(maxsize=1024)
def _origin(replica_url: str) -> str:
    """scheme://authority[/prefix] of a replica URL, from its parsed parts."""
    base = URL(replica_url)
    return f"{base.scheme}://{base.raw_authority}{base.raw_path.rstrip('/')}"


def upstream_url(replica_url: str, target: str) -> URL:
    """The replica's scheme, host and port with the request's path and query: the authority
    comes from the replica alone and the target always starts a path, so nothing in it (`//host`,
    `@host`, `*`) can name another host; ValueError for a path with a dot segment, which could
    leave the replica URL's path prefix (see dot_segment)."""
    path = target if target.startswith("/") else "/" + target
    if dot_segment(path):
        raise ValueError(f"path {path[:200]!r} holds a '.' or '..' segment")
    return URL(_origin(replica_url) + path, encoded=True)
