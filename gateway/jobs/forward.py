"""The jobs endpoints in a worker that is not the jobs leader (`workers: N`): the store and its
scheduler live in worker 0 alone (one scheduler per store), and every other worker passes the
jobs requests it accepts to worker 0 over a Unix socket, so any worker answers for any job.

The request is authenticated here as everywhere (`auth`) and again by the leader, which owns
the answer; the body is read with the batch-size cap first, so a forwarder holds no more than
the leader would accept.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from gateway.datapath.body import read_body
from gateway.errors import GatewayError, UpstreamError
from gateway.jobs.files import MULTIPART_SLACK
from gateway.pool.live import LIVE

LEADER = web.AppKey("jobs_leader", aiohttp.ClientSession)
PASSED_REQUEST_HEADERS = ("Authorization", "Content-Type", "X-Request-Id")
PASSED_RESPONSE_HEADERS = (
    "Content-Type", "Content-Disposition", "Location", "Retry-After", "WWW-Authenticate",
)  # fmt: skip
CONNECT_TRIES, CONNECT_RETRY_S = 100, 0.1  # worker 0 may be (re)starting: up to 10 s


class JobsWorkerDown(GatewayError):
    status = 503
    error_type = "jobs_unavailable"


def lifetime(socket_path: str) -> Callable[[web.Application], AsyncIterator[None]]:
    """The client session to the leader's socket, for the app's lifetime."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.UnixConnector(path=socket_path)
        app[LEADER] = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=300)
        )
        yield
        await app[LEADER].close()

    return ctx


async def forward(request: web.Request) -> web.StreamResponse:
    config = request.app[LIVE].runtime.config
    limit = config.limits.max_body_bytes
    if request.path in ("/v1/batches", "/v1/files") and config.jobs is not None:
        # The leader says what is wrong past it (an upload's form adds its boundaries).
        limit = config.jobs.max_batch_bytes + MULTIPART_SLACK
    body = await read_body(request, limit + 1, config.timeouts.client_body_s)
    headers = {h: request.headers[h] for h in PASSED_REQUEST_HEADERS if h in request.headers}
    url = f"http://jobs{request.rel_url.raw_path_qs}"
    for attempt in range(CONNECT_TRIES):
        try:
            async with request.app[LEADER].request(
                request.method, url, data=body or None, headers=headers
            ) as answer:
                return await _relay(request, answer)
        except aiohttp.ClientConnectorError:  # worker 0 starting, or started again
            if attempt + 1 < CONNECT_TRIES:
                await asyncio.sleep(CONNECT_RETRY_S)
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"the jobs worker failed: {type(exc).__name__}") from None
    raise JobsWorkerDown(
        "the jobs worker (worker 0) is starting; try again", headers={"Retry-After": "2"}
    )


async def _relay(request: web.Request, answer: aiohttp.ClientResponse) -> web.StreamResponse:
    """The leader's answer, streamed (a batch's results can be large)."""
    kept = {h: answer.headers[h] for h in PASSED_RESPONSE_HEADERS if h in answer.headers}
    response = web.StreamResponse(status=answer.status, headers=kept)
    if answer.content_length is not None:
        response.content_length = answer.content_length
    await response.prepare(request)
    async for chunk in answer.content.iter_chunked(64 * 1024):
        await response.write(chunk)
    await response.write_eof()
    return response
