"""Load generators count a stream as served only when it ends with [DONE] and has no error."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from loadtests.chaos import completion, one_request
from loadtests.load.openloop import one
from loadtests.load.sse import StreamCheck
from loadtests.load.workload import CompletionRequest, Workload

CHUNK = b'data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n'
ERROR = b'event: error\ndata: {"error": {"type": "internal_error", "message": "broke"}}\n\n'
PLAIN_ERROR = b'data: {"error": {"type": "queue_timeout", "message": "waited"}}\n\n'
DONE = b"data: [DONE]\n\n"

Serve = Callable[[bytes], Awaitable[str]]


def check(body: bytes) -> StreamCheck:
    result = StreamCheck()
    for line in body.splitlines(keepends=True):
        result.feed(line)
    return result


def test_a_whole_stream_is_ok_and_counts_its_tokens() -> None:
    result = check(CHUNK * 3 + DONE)
    assert result.ok
    assert result.tokens == 3


@pytest.mark.parametrize(
    "body",
    [
        CHUNK + ERROR,  # the replica's mid-stream failure
        CHUNK + ERROR + DONE,  # an error event is a failure even if [DONE] follows
        CHUNK + PLAIN_ERROR + DONE,  # OpenAI's form: an `error` key in a data event
        CHUNK * 2,  # cut: no [DONE]
        CHUNK + b"data: {not json\n\n" + DONE,
    ],
)
def test_an_error_event_or_a_missing_done_is_a_failure(body: bytes) -> None:
    assert not check(body).ok


def test_the_error_message_is_kept_and_the_event_field_ends_with_its_event() -> None:
    result = check(ERROR + CHUNK)
    assert result.error == "broke"
    assert result.tokens == 1  # the chunk after the error event is an ordinary one


def test_lines_without_newlines_as_requests_gives_them() -> None:
    result = StreamCheck()
    for line in [b"event: error", b'data: {"error": {"message": "x"}}', b"", b"data: [DONE]"]:
        result.feed(line)
    assert result.done and result.error == "x" and not result.ok


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(body: bytes) -> str:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(body)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(
    "broken",
    [CHUNK + ERROR, CHUNK + PLAIN_ERROR + DONE],  # today's replica; the one before the fix
)
async def test_openloop_and_chaos_count_a_failed_stream_as_failed(
    serve: Serve, broken: bytes
) -> None:
    broken_url, whole_url = await serve(broken), await serve(CHUNK + DONE)
    request = CompletionRequest(prompt="x", max_tokens=4, stream=True)
    async with aiohttp.ClientSession() as client:
        assert not (await one(client, broken_url, Workload(), request)).ok
        assert (await one(client, whole_url, Workload(), request)).ok
        outcome = await one_request(client, broken_url, completion(4, stream=True))
        assert outcome.failed and outcome.error_event
        assert not (await one_request(client, whole_url, completion(4, stream=True))).failed


def test_a_chat_stream_counts_content_deltas_and_its_first_token_is_the_first_content() -> None:
    check = StreamCheck()
    role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n'
    text = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n'
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3}}\n'
    assert [check.feed(line) for line in (role, b"\n", text, b"\n", usage, b"\n")] == [
        False, False, True, False, False, False,
    ]  # fmt: skip
    check.feed(b"data: [DONE]\n")
    assert check.ok and check.tokens == 1
