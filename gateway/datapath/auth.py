"""API keys (config `auth.api_keys`): who may use the proxied and jobs endpoints, and as whom.

The first step on those routes (server.py wraps their handlers with `require_key`), before any
body is read. With `auth` configured a request must carry `Authorization: Bearer <key>`: the key
is hashed with SHA-256 and compared in constant time with every configured digest, and the
matching key's name becomes the request's identity (`key_name(request)`): the owner of the jobs
it creates and the `key` label of its metrics. Without `auth` every request passes, named ''.
The config is read per request, so keys change with a hot reload. The key is never stored or
logged; it is forwarded to the replica with the rest of the request's headers.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.config import ApiKey, Auth
from gateway.errors import Unauthorized
from gateway.pool.live import LIVE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEY_NAME = web.RequestKey("api_key_name", str)  # where require_key leaves the key's name
API_KEY = web.RequestKey("api_key", ApiKey)  # and the key's config
MISSING = "this gateway needs an API key: send 'Authorization: Bearer <key>'"
WRONG = "the API key is not valid for this gateway"


def key_name(request: web.BaseRequest) -> str:
    """The name of the API key this request authenticated with; '' when auth is off."""
    name: str = request.get(KEY_NAME, "")
    return name


def as_sent(value: str) -> bytes:
    """A header value's bytes as the client sent them. aiohttp decodes header bytes that are not
    UTF-8 with `surrogateescape`; encoding them back that way gives those exact bytes, so a
    token is compared byte for byte (no two spellings of one key) and no byte can raise."""
    return value.encode("utf-8", "surrogateescape")


def bearer_token(authorization: str | None) -> bytes | None:
    """The token of `Authorization: Bearer <token>` as sent; None for any other value."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return as_sent(token) if scheme.lower() == "bearer" and token else None


def identify(auth: Auth, authorization: str | None) -> ApiKey:
    """The key in an Authorization header value; Unauthorized if there is none."""
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized(MISSING)
    digest = hashlib.sha256(token).digest()
    found: ApiKey | None = None
    for key in auth.api_keys:  # every digest is compared: the time does not depend on which
        if hmac.compare_digest(digest, key.digest) and found is None:
            found = key
    if found is None:
        raise Unauthorized(WRONG)
    return found


def api_key(request: web.BaseRequest) -> ApiKey | None:
    """The configured key this request authenticated with (its tenant, class, limits); None
    when auth is off."""
    key: ApiKey | None = request.get(API_KEY)
    return key


def authenticate(request: web.Request) -> None:
    """Names the request's key (`key_name`, `api_key`); Unauthorized without a valid one when
    auth is on. Also run for `Expect: 100-continue`, before the client sends its body
    (server.py)."""
    auth = request.app[LIVE].runtime.config.auth
    if auth is not None:
        key = identify(auth, request.headers.get("Authorization"))
        request[API_KEY] = key
        request[KEY_NAME] = key.name


def require_key(handler: Handler) -> Handler:
    async def authenticated(request: web.Request) -> web.StreamResponse:
        authenticate(request)
        return await handler(request)

    return authenticated
