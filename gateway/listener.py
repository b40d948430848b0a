"""Client connection limit: past `limits.max_connections` open connections, a new one gets a
503 JSON answer and is closed at once, before any request is read.

aiohttp has no such setting; its server tells us of each new connection (`connection_made`),
which is where the count is checked. Idle connections are closed after
`limits.client_keepalive_s`, which also bounds how long a client may take to send its headers.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from gateway.errors import error_body

_BODY = json.dumps(
    error_body("too_many_connections", "the gateway is at limits.max_connections; retry shortly")
).encode()
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


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
