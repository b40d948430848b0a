"""The gateway's listening side: the sockets of `workers: N`, and the client connection limit.

Past `limits.max_connections` open connections, a new one gets a 503 JSON answer and is closed
at once, before any request is read. aiohttp has no such setting; its server tells us of each
new connection (`connection_made`), which is where the count is checked. Idle connections are
closed after `limits.client_keepalive_s`, which also bounds how long a client may take to send
its headers.
"""

from __future__ import annotations

import asyncio
import json
import socket

from aiohttp import web

from gateway.errors import error_body

_BODY = json.dumps(
    error_body("too_many_connections", "the gateway is at limits.max_connections; retry shortly")
).encode()
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, not listening yet. Each worker of
    `workers: N` listens on its own one (aiohttp calls listen() as it starts serving), and the
    kernel hashes every new connection to one of the sockets listening on the port: the
    workers share connections evenly whichever of them is awake first. (With one shared
    socket, the worker that wakes first takes the connection, and at light load one worker
    took them all.) Port 0: the kernel picks one; bind the others to the port it picked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def limit_connections(runner: web.AppRunner, max_connections: int) -> None:
    server = runner.server
    assert server is not None, "call after runner.setup()"
    accept = server.connection_made

    def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        accept(handler, transport)
        if len(server.connections) > max_connections:
            transport.write(REFUSAL)
            handler.force_close()
            transport.close()

    server.connection_made = connection_made  # type: ignore[method-assign]
