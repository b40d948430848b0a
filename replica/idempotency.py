"""`Idempotency-Key` on the replica (IETF draft-ietf-httpapi-idempotency-key-header): a POST sent
again with the key of one this replica already answered gets that answer again, marked
`Idempotent-Replayed: true`, without running the model a second time.

Why: the gateway's jobs are at-least-once by nature. A gateway killed after a replica answered
but before the result was recorded leaves the job to be run again; the gateway sends every job
with its id as the key, and a re-run goes back to the replica that had it (gateway/jobs/), so
the model runs once. Real-time clients may send a key too (a retry after a dropped connection).

- The key names one request: the same key with another method, path or body is a 422.
- A request whose key is being answered right now waits for that answer (and replays it);
  if that one fails or its client goes away, the waiting request runs itself.
- Only complete 2xx answers are kept (never a stream, never an error), in memory, least
  recently used first out, within `MAX_ENTRIES`, `MAX_BYTES` and `TTL_S`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from replica.errors import BadRequest, IdempotencyKeyReused
from replica.request_body import read_body

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
MAX_ENTRIES = 10_000
MAX_BYTES = 64 * 1024 * 1024
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a larger answer is sent but not kept
TTL_S = 3600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Answer:
    fingerprint: bytes  # of the request it answered
    status: int
    body: bytes
    content_type: str
    charset: str | None
    at: float

    @property
    def size(self) -> int:
        return len(self.body) + 200


class AnswerCache:
    """Answers by key, bounded; and the keys being answered now."""

    def __init__(
        self, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES,
        ttl_s: float = TTL_S, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        # Keys being answered now: when that answer is done, and the request it answers.
        self.pending: dict[str, tuple[asyncio.Future[None], bytes]] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> Answer | None:
        answer = self._answers.get(key)
        if answer is None:
            return None
        if self._clock() - answer.at > self._ttl_s:
            self._drop(key)
            return None
        self._answers.move_to_end(key)
        return answer

    def put(self, key: str, fingerprint: bytes, response: web.Response) -> None:
        body = response.body
        if not isinstance(body, bytes) or len(body) > MAX_ANSWER_BYTES:
            return
        if key in self._answers:
            self._drop(key)
        answer = Answer(
            fingerprint, response.status, body, response.content_type, response.charset,
            self._clock(),
        )  # fmt: skip
        self._answers[key] = answer
        self._bytes += answer.size
        while len(self._answers) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._answers)))

    def _drop(self, key: str) -> None:
        self._bytes -= self._answers.pop(key).size


def fingerprint(request: web.Request, body: bytes) -> bytes:
    digest = hashlib.sha256(f"{request.method} {request.path_qs}\n".encode())
    digest.update(body)
    return digest.digest()


def checked_key(value: str) -> str:
    if not 1 <= len(value) <= MAX_KEY_CHARS or not value.isprintable() or not value.isascii():
        raise BadRequest(
            f"{HEADER}: expected 1 to {MAX_KEY_CHARS} printable ASCII characters "
            "(a unique id per request, e.g. a UUID)"
        )
    return value


def replay(answer: Answer) -> web.Response:
    return web.Response(
        status=answer.status, body=answer.body, content_type=answer.content_type,
        charset=answer.charset, headers={REPLAYED: "true"},
    )  # fmt: skip


def reused(key: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        f"{HEADER} {key!r} was used for another request (method, path or body differ): use a "
        "new key for a new request"
    )


def middleware(cache: AnswerCache, on_replay: Callable[[], None]) -> Middleware:
    """The aiohttp middleware; `on_replay` counts each answer sent again."""

    @web.middleware
    async def idempotency(request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = request.headers.get(HEADER)
        if raw is None or request.method != "POST":
            return await handler(request)
        key = checked_key(raw)
        mark = fingerprint(request, await read_body(request))
        while (answer := cache.get(key)) is None and key in cache.pending:
            running, running_mark = cache.pending[key]
            if running_mark != mark:
                raise reused(key)
            await asyncio.shield(running)  # the same request, being answered now
        if answer is not None:
            if answer.fingerprint != mark:
                raise reused(key)
            on_replay()
            return replay(answer)
        done = asyncio.get_running_loop().create_future()
        cache.pending[key] = (done, mark)
        try:
            response = await handler(request)
            if type(response) is web.Response and 200 <= response.status < 300:
                cache.put(key, mark, response)
            return response
        finally:
            del cache.pending[key]
            done.set_result(None)

    return idempotency
