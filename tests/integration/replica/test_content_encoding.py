"""Request bodies as the client framed them: a body with a Content-Encoding other than identity
is a 415 naming the encoding (the replica does not decompress, as vLLM and uvicorn do not; it
was a 500 and a traceback from aiohttp's decompressor), and a chunked body whose framing breaks
mid-read is a 400. Real replica processes, raw sockets; no traceback in the log, counts at zero."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.processes import REPLICA_CONFIG, replica_process
from tests.support.raw_http import RawResponse, read_response

API_KEY = "sk-ENCODINGSECRET-51a7c0"
COMPLETION = json.dumps({"model": "tiny-gpt", "prompt": "hi", "max_tokens": 2}).encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        "Host: x",
        "Content-Type: application/json",
        f"Authorization: Bearer {API_KEY}",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


async def exchange(port: int, *requests: bytes) -> list[RawResponse]:
    """The requests one after another on one connection, each answer read before the next."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for request in requests:
            writer.write(request)
            await writer.drain()
            answers.append(await read_response(reader))
    finally:
        writer.close()
    return answers


def assert_clean(log: Path) -> None:
    output = log.read_text(errors="replace")
    assert "Traceback" not in output and "ENCODINGSECRET" not in output, output


ENCODED: dict[str, tuple[str, bytes, Callable[[bytes], bytes]]] = {
    "gzip, not gzip": ("gzip", b"not gzip at all", lambda body: body),
    "deflate, not deflate": ("deflate", b"not deflate at all", lambda body: body),
    "gzip, valid": ("gzip", COMPLETION, gzip.compress),
    "deflate, valid": ("deflate", COMPLETION, zlib.compress),
    "br": ("br", b"\x8b\x02\x80", lambda body: body),
    "two codings": ("identity, gzip", COMPLETION, gzip.compress),
}


async def test_an_encoded_body_is_a_415_naming_the_encoding(tmp_path: Path) -> None:
    async with replica_process(tmp_path, {}) as (port, log):
        for case, (encoding, body, encode) in ENCODED.items():
            for path in ("/v1/completions", "/invocations", "/v2/models/tiny-gpt/infer"):
                refused, after = await exchange(
                    port,
                    post(path, encode(body), f"Content-Encoding: {encoding}"),
                    post("/v1/completions", COMPLETION),  # the connection is still in step
                )
                assert refused.status == 415, (case, path, refused)
                assert refused.headers["accept-encoding"] == "identity", (case, path)
                error = refused.json()["error"]
                message = error if isinstance(error, str) else error["message"]  # KServe's shape
                assert f"Content-Encoding {encoding!r}" in message, (case, path, message)
                assert "send the body uncompressed" in message, (case, path, message)
                assert after.status == 200, (case, path, after)
        # identity is no encoding; a bodiless request's header is not refused
        (plain,) = await exchange(
            port, post("/v1/completions", COMPLETION, "Content-Encoding: identity")
        )
        assert plain.status == 200, plain
        (models,) = await exchange(
            port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n\r\n"
        )
        assert models.status == 200, models
        load = models.headers["x-replica-load"]
        assert "queued=0,running=0," in load and "inflight=0," in load, load
    assert_clean(log)


@pytest.mark.parametrize(
    "tail", [f"zz{API_KEY}\r\n".encode(), b"3\r\nabcXY\r\n"], ids=["chunk size", "chunk end"]
)
async def test_chunk_framing_broken_mid_body_is_a_400(tmp_path: Path, tail: bytes) -> None:
    """aiohttp's own parser (pure Python, used where its C extension is not built) reports a
    chunk broken after the request reached the handler as a RequestPayloadError from the read."""
    async with replica_process(tmp_path, {"AIOHTTP_NO_EXTENSIONS": "1"}) as (port, log):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                + f"Authorization: Bearer {API_KEY}\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            interim = await read_response(reader)  # the handler runs: its read meets the error
            assert interim.status == 100, interim
            writer.write(b'5\r\n{"mod\r\n' + tail)
            answer = await read_response(reader)
        finally:
            writer.close()
        assert answer.status == 400, answer
        message = answer.json()["error"]["message"]
        assert "chunked" in message and API_KEY not in message, message
        (models,) = await exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        load = models.headers["x-replica-load"]
        assert "queued=0,running=0," in load and "inflight=0," in load, load
    assert_clean(log)


async def test_chunk_framing_broken_mid_body_ends_at_client_body_s(tmp_path: Path) -> None:
    """With aiohttp's C parser (the default) the broken body is dropped without a word to the
    reader: the read would wait for ever; server.client_body_s ends it with a 408."""
    text = REPLICA_CONFIG + "server: {client_body_s: 0.5}\n"
    async with replica_process(tmp_path, {}, text) as (port, log):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                + f"Authorization: Bearer {API_KEY}\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            interim = await read_response(reader)
            assert interim.status == 100, interim
            writer.write(b'5\r\n{"mod\r\nzz\r\n')
            answer = await asyncio.wait_for(read_response(reader), 10)
        finally:
            writer.close()
        assert answer.status == 408, answer
        assert "client_body_s" in answer.json()["error"]["message"], answer
        (models,) = await exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        load = models.headers["x-replica-load"]
        assert "queued=0,running=0," in load and "inflight=0," in load, load
    assert_clean(log)
