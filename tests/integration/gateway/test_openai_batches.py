"""The OpenAI Files and Batches API through a real gateway, driven by the official `openai` SDK
as a user's script would: upload, create, poll, read the output and error files, list with
pagination, cancel, expire at the completion window, delete; on SQLite and on PostgreSQL.
Our replica (simulated engine, in this process) answers the lines; bad files and another key's
file get OpenAI-shaped errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types import Batch

from replica.config import parse_config
from replica.keys import STATE
from replica.server import create_app
from tests.support.servers import Gateway, running_gateway, serve, wait_until, write_config

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-fedcba9876543210"
CHAT = "/v1/chat/completions"
ENDED = ("completed", "cancelled", "expired", "failed")


@asynccontextmanager
async def our_replica(max_tokens: int = 16) -> AsyncIterator[str]:
    """Our replica (simulated 7B engine timing) serving tiny-gpt."""
    config = {
        "server": {"port": 0},
        "engine": {"kind": "simulated"},
        "models": [{"kind": "tiny-gpt", "max_tokens_limit": max_tokens}],
    }
    app = create_app(parse_config(config))
    async with serve(app) as url:
        await app[STATE].settled.wait()
        yield url


@asynccontextmanager
async def batch_gateway(
    tmp_path: Path, store: str, **jobs: Any
) -> AsyncIterator[tuple[Gateway, AsyncOpenAI, AsyncOpenAI]]:
    """Our replica behind a gateway with a job store and two API keys; an SDK client per key."""
    digest = hashlib.sha256(KEY_A.encode()).hexdigest()
    keys = [{"name": "team-a", "sha256": digest}, {"name": "team-b", "key": KEY_B}]
    async with our_replica() as replica:
        config = {
            "replicas": [{"url": replica}],
            "auth": {"api_keys": keys},
            "jobs": {"store": store, "poll_interval_s": 0.01, **jobs},
            "served_models": {"interval_s": 0.05},
        }
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gateway:
            await wait_until(lambda: "tiny-gpt" in gateway.state.pool.catalog(), timeout_s=10)
            base = f"{gateway.url}/v1"
            async with (
                AsyncOpenAI(base_url=base, api_key=KEY_A, max_retries=0) as a,
                AsyncOpenAI(base_url=base, api_key=KEY_B, max_retries=0) as b,
            ):
                yield gateway, a, b
            await wait_until(lambda: gateway.state.pool.outstanding == 0)


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def chat_line(custom_id: str, model: str = "tiny-gpt", max_tokens: int = 4) -> dict[str, Any]:
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Say {custom_id}"}]}  # fmt: skip
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def completion_line(custom_id: str) -> dict[str, Any]:
    body = {"model": "tiny-gpt", "prompt": f"Once {custom_id}", "max_tokens": 4}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


async def ended(client: AsyncOpenAI, batch_id: str, timeout_s: float = 30) -> Batch:
    """The batch once it ended (polled as a script would, bounded)."""
    async with asyncio.timeout(timeout_s):
        while (batch := await client.batches.retrieve(batch_id)).status not in ENDED:
            await asyncio.sleep(0.05)
    return batch


async def lines_of(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def test_the_sdk_runs_chat_and_completion_batches_with_a_failing_line(
    tmp_path: Path, store: str
) -> None:
    async with batch_gateway(tmp_path, store) as (_, sdk, _b):
        chat = [chat_line(f"c{i}") for i in range(3)] + [chat_line("bad", model="no-such")]
        upload = await sdk.files.create(file=("chat.jsonl", jsonl(chat)), purpose="batch")
        assert (upload.purpose, upload.filename) == ("batch", "chat.jsonl")
        assert upload.bytes == len(jsonl(chat))
        created = await sdk.batches.create(
            input_file_id=upload.id, endpoint=CHAT, completion_window="24h",
            metadata={"job": "nightly"},
        )  # fmt: skip
        assert created.status == "in_progress" and created.input_file_id == upload.id
        assert created.endpoint == CHAT and created.metadata == {"job": "nightly"}
        done = await ended(sdk, created.id)
        completions = await sdk.files.create(
            file=("c.jsonl", jsonl([completion_line("p0"), completion_line("p1")])),
            purpose="batch",
        )
        other = await sdk.batches.create(
            input_file_id=completions.id, endpoint="/v1/completions", completion_window="24h"
        )
        other_done = await ended(sdk, other.id)

        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (4, 3)
        assert done.request_counts.failed == 1
        assert done.completed_at is not None and done.in_progress_at is not None
        output = await lines_of(sdk, done.output_file_id)
        assert [line["custom_id"] for line in output] == ["c0", "c1", "c2"]
        for line in output:
            assert line["error"] is None and line["response"]["status_code"] == 200
            assert line["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
        errors = await lines_of(sdk, done.error_file_id)
        assert [line["custom_id"] for line in errors] == ["bad"]
        assert errors[0]["response"]["status_code"] == 404  # the gateway's: no such model
        assert "no-such" in json.dumps(errors[0]["response"]["body"])

        assert other_done.status == "completed" and other_done.error_file_id is None
        texts = await lines_of(sdk, other_done.output_file_id)
        assert [line["custom_id"] for line in texts] == ["p0", "p1"]
        assert all(line["response"]["body"]["object"] == "text_completion" for line in texts)

        # An output file is a file like an upload: its size is its content's.
        assert done.output_file_id is not None
        meta = await sdk.files.retrieve(done.output_file_id)
        content = await sdk.files.content(done.output_file_id)
        assert (meta.purpose, meta.bytes) == ("batch_output", len(content.content))

        # Listing, a page at a time: the SDK follows `after` to the end.
        first = await sdk.batches.list(limit=1)
        assert len(first.data) == 1 and first.has_more
        assert {b.id async for b in sdk.batches.list(limit=1)} == {created.id, other.id}
        files = [f.id async for f in sdk.files.list(limit=2)]
        assert len(files) == len(set(files)) == 5  # two uploads, two outputs, one error file
        assert files[0] == other_done.output_file_id  # newest first, as OpenAI lists them
        uploads = [f.id async for f in sdk.files.list(purpose="batch")]
        assert set(uploads) == {upload.id, completions.id}

        deleted = await sdk.files.delete(upload.id)
        assert deleted.deleted
        with pytest.raises(openai.NotFoundError):
            await sdk.files.retrieve(upload.id)


async def test_a_cancel_stops_the_lines_not_yet_run(tmp_path: Path, store: str) -> None:
    async with batch_gateway(tmp_path, store) as (_, sdk, _b):
        lines = [chat_line(f"c{i}", max_tokens=16) for i in range(30)]
        upload = await sdk.files.create(file=("many.jsonl", jsonl(lines)), purpose="batch")
        batch = await sdk.batches.create(
            input_file_id=upload.id, endpoint=CHAT, completion_window="24h"
        )
        cancelling = await sdk.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        assert cancelling.cancelling_at is not None
        done = await ended(sdk, batch.id)
        assert done.status == "cancelled" and done.cancelled_at is not None
        assert done.request_counts is not None
        counts = done.request_counts
        assert counts.total == 30 and counts.completed + counts.failed == 30
        assert counts.failed > 0
        errors = await lines_of(sdk, done.error_file_id)
        assert len(errors) == counts.failed
        assert {line["error"]["code"] for line in errors} == {"cancelled"}
        with pytest.raises(openai.ConflictError):
            await sdk.batches.cancel(batch.id)


async def test_lines_not_run_within_the_completion_window_expire(
    tmp_path: Path, store: str
) -> None:
    # One job at a time at the replica, ~0.5 s each: a 1 s window runs a few of the 12.
    async with batch_gateway(tmp_path, store, max_outstanding_per_replica=1) as (gw, sdk, _b):
        lines = [chat_line(f"c{i}", max_tokens=16) for i in range(12)]
        upload = await sdk.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
        batch = await sdk.batches.create(
            input_file_id=upload.id, endpoint=CHAT,
            completion_window="1s",  # type: ignore[arg-type]  # OpenAI's only value is "24h"
        )  # fmt: skip
        assert batch.expires_at is not None and batch.expires_at - batch.created_at <= 1
        done = await ended(sdk, batch.id)
        assert done.status == "expired" and done.expired_at is not None
        assert done.request_counts is not None
        counts = done.request_counts
        assert counts.completed + counts.failed == 12 and counts.failed > 0
        errors = await lines_of(sdk, done.error_file_id)
        assert len(errors) == counts.failed
        assert {line["error"]["code"] for line in errors} == {"batch_expired"}
        if counts.completed:
            assert len(await lines_of(sdk, done.output_file_id)) == counts.completed
        await wait_until(lambda: gw.state.pool.outstanding == 0)


async def _refused(call: Any, status: int) -> str:
    """The message of the OpenAI-shaped error `call` got, after checking its status."""
    with pytest.raises(openai.APIStatusError) as caught:
        await call
    assert caught.value.status_code == status, caught.value
    body = caught.value.body
    assert isinstance(body, dict) and set(body) >= {"message", "type"}, body
    return str(body["message"])


async def test_bad_files_and_another_keys_file_get_openai_shaped_errors(
    tmp_path: Path, store: str
) -> None:
    async with batch_gateway(tmp_path, store, max_batch_bytes=4096) as (_, sdk, other):
        files = sdk.files
        message = await _refused(
            files.create(file=("x.txt", b"hello\nworld\n"), purpose="batch"), 400
        )
        assert "line 1: not valid JSON" in message and "line 2" in message
        twice = jsonl([chat_line("same"), chat_line("other"), chat_line("same")])
        message = await _refused(files.create(file=("d.jsonl", twice), purpose="batch"), 400)
        assert "line 3: custom_id 'same' is also on line 1" in message
        big = jsonl([chat_line(f"c{i}") for i in range(40)])
        assert len(big) > 4096
        message = await _refused(files.create(file=("big.jsonl", big), purpose="batch"), 413)
        assert "max_batch_bytes = 4096" in message
        wrong = files.create(file=("ok.jsonl", jsonl([chat_line("a")])), purpose="fine-tune")
        assert "purpose" in await _refused(wrong, 400)

        good = await files.create(file=("ok.jsonl", jsonl([chat_line("a")])), purpose="batch")
        create = sdk.batches.create
        message = await _refused(
            create(input_file_id=good.id, endpoint="/v1/images/generations",  # type: ignore[arg-type]
                   completion_window="24h"), 400,
        )  # fmt: skip
        assert message.startswith("endpoint: expected one of /v1/chat/completions")
        message = await _refused(
            create(input_file_id=good.id, endpoint="/v1/completions", completion_window="24h"),
            400,
        )
        assert "line 1: url '/v1/chat/completions' is not the batch's endpoint" in message
        message = await _refused(
            create(input_file_id=good.id, endpoint=CHAT, completion_window="forever"),  # type: ignore[arg-type]
            400,
        )
        assert message.startswith("completion_window: expected")

        # Another key's file is no file at all: not read, used, listed or deleted.
        theirs = other.batches.create(input_file_id=good.id, endpoint=CHAT, completion_window="24h")
        assert "no file" in await _refused(theirs, 404)
        await _refused(other.files.content(good.id), 404)
        await _refused(other.files.delete(good.id), 404)
        assert [f.id async for f in other.files.list()] == []
        assert (await files.retrieve(good.id)).id == good.id


async def test_a_broken_upload_form_gets_a_400_that_says_what_to_fix(
    tmp_path: Path, store: str
) -> None:
    good = jsonl([chat_line("a")])
    boundary = "b0undary"
    head = f"--{boundary}\r\nContent-Disposition: form-data; name="

    def form(*parts: str, end: bool = True) -> bytes:
        return ("".join(parts) + (f"--{boundary}--\r\n" if end else "")).encode()

    purpose = f'{head}"purpose"\r\n\r\nbatch\r\n'
    file_part = f'{head}"file"; filename="a.jsonl"\r\n\r\n{good.decode()}\r\n'
    cases = {
        "not multipart": (b"purpose=batch", "application/x-www-form-urlencoded", "multipart"),
        "no file": (form(purpose), None, "file: required"),
        "no purpose": (form(file_part), None, "purpose: expected 'batch' (got missing)"),
        "unknown field": (form(purpose, file_part, f'{head}"x"\r\n\r\n1\r\n'), None, "'x'"),
        "purpose twice": (form(purpose, purpose, file_part), None, "sent twice"),
        "long field": (
            form(f'{head}"purpose"\r\n\r\n{"b" * 5000}\r\n', file_part),
            None,
            "over 1024 bytes",
        ),
        "control in filename": (
            form(purpose, f'{head}"file"; filename="a\x01.jsonl"\r\n\r\n{good.decode()}\r\n'),
            None,
            "multipart body is broken",
        ),
        "control in encoded filename": (
            form(
                purpose, f"{head}\"file\"; filename*=UTF-8''a%01.jsonl\r\n\r\n{good.decode()}\r\n"
            ),
            None,
            "filename must be printable",
        ),
        "cut short": (form(purpose, file_part[:60], end=False), None, "multipart body is broken"),
    }
    async with (
        batch_gateway(tmp_path, store) as (gw, sdk, _b),
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY_A}"}) as client,
    ):
        answers = {}
        for name, (body, sent_as, _) in cases.items():
            kind = sent_as or f"multipart/form-data; boundary={boundary}"
            async with client.post(
                f"{gw.url}/v1/files", data=body, headers={"Content-Type": kind}
            ) as response:
                answers[name] = (response.status, await response.json())
        # And a whole form, well made, is taken.
        async with client.post(
            f"{gw.url}/v1/files", data=form(purpose, file_part),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        ) as response:  # fmt: skip
            taken = response.status, await response.json()
        listed = [f.id async for f in sdk.files.list()]
    for name, (_, _, says) in cases.items():
        status, body = answers[name]
        assert status == 400, (name, body)
        assert says in body["error"]["message"], (name, body)
    assert taken[0] == 200 and listed == [taken[1]["id"]]
