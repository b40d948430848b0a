"""The checks a request meets before its handler, and the one error middleware: every refusal
is JSON `{"error": {"type", "message"}}`. `expecting` answers `Expect: 100-continue` from the
same checks, before the body is sent; `only` keeps a gateway path to its methods;
`require_admin` guards /admin; `is_admin_path` knows every spelling of it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import posixpath
import re
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion11, hdrs, web

from gateway.app.state import APP, AppState
from gateway.datapath.auth import as_sent, authenticate, bearer_token
from gateway.errors import BodyTooLarge, GatewayError, error_body
from gateway.pool.live import LIVE

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_BODY_HEADERS = frozenset({"content-type", "content-length"})


def error_response(
    status: int,
    error_type: str,
    message: str,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> web.Response:
    body = error_body(error_type, message, code)
    return web.json_response(body, status=status, headers=headers)


def refusal(exc: GatewayError | web.HTTPException) -> web.Response:
    """The JSON answer to an error a check or handler raised."""
    if isinstance(exc, GatewayError):
        return error_response(exc.status, exc.error_type, str(exc), exc.headers, exc.code)
    kind = exc.reason.lower().replace(" ", "_")
    # Its own headers (WWW-Authenticate, Allow) stay; the body becomes our JSON.
    kept = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    return error_response(exc.status, kind, exc.text or exc.reason, kept)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return refusal(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return refusal(exc)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "the gateway failed; see its log")


Check = Callable[[web.Request], object]  # raises a GatewayError or HTTPException to refuse
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def expecting(*checks: Check) -> ExpectHandler:
    """A route's answer to `Expect: 100-continue`: a request its headers alone refuse (`checks`:
    the API key, the admin token, the Content-Length) gets that refusal instead of `100
    Continue`, and its connection is closed, as the body the client holds back is never read
    (RFC 9110 10.1.1); an Expect other than 100-continue is a 417. aiohttp runs this before
    the middleware and the handler, which make the same checks again for requests without it."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version < HttpVersion11:
            return None  # HTTP/1.0 clients do not wait for a 100 (RFC 9110: ignore Expect)
        value = request.headers.get(hdrs.EXPECT, "")
        try:
            if value.strip().lower() != "100-continue":
                raise web.HTTPExpectationFailed(
                    text=f"Expect: {value[:40]!r} is not supported; send 100-continue or none"
                )
            for check in checks:
                check(request)
        except (GatewayError, web.HTTPException) as exc:
            response = refusal(exc)
            response.force_close()
            return response
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the final response's size starts after the 100
        return None

    return expect


def body_fits(request: web.Request) -> None:
    """A declared Content-Length within the limit its handler reads the body with."""
    config = request.app[LIVE].runtime.config
    limit, name = config.limits.max_body_bytes, "limits.max_body_bytes"
    if request.path == "/v1/batches" and config.jobs is not None:
        limit, name = config.jobs.max_batch_bytes, "jobs.max_batch_bytes"
    if (request.content_length or 0) > limit:
        raise BodyTooLarge(f"request body over {name} = {limit} bytes")


def proxied_checks(request: web.Request) -> None:
    if is_admin_path(request.path):  # the catch-all's spellings of /admin (see _proxied)
        require_admin(request)
    else:
        authenticate(request)
        body_fits(request)


def only(methods: tuple[str, ...], handler: Handler) -> Handler:
    """Gateway-owned paths answer 405 to other methods instead of being proxied."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if request.method not in methods:
            allowed = " or ".join(methods)
            raise web.HTTPMethodNotAllowed(
                request.method,
                methods,
                text=f"{request.path} answers {allowed}, not {request.method}",
            )
        return await handler(request)

    return guarded


def require_admin(request: web.Request) -> AppState:
    state = request.app[APP]
    if state.admin_token is None:
        raise web.HTTPNotFound(text=f"{request.path} is off: set INFERGATE_ADMIN_TOKEN to enable")
    token = bearer_token(request.headers.get("Authorization"))
    if token is None or not hmac.compare_digest(token, as_sent(state.admin_token)):
        raise web.HTTPUnauthorized(
            text="admin endpoints need 'Authorization: Bearer <INFERGATE_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return state


def is_admin_path(path: str) -> bool:
    """`/admin` or below it, however spelled (`//admin`, `/x/../admin`, `/admin%2F` decoded)."""
    if "/admin" not in path:
        return False  # the common case, at the cost of one substring search
    normal = posixpath.normpath(re.sub("/+", "/", path))
    return normal == "/admin" or normal.startswith("/admin/")
