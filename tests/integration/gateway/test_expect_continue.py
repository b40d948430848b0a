"""`Expect: 100-continue` through a real gateway, with a raw socket client that waits for the
interim answer before it sends its body (as curl does past 1 KiB): a request the gateway will
refuse from its headers alone (no or a wrong API key, a Content-Length over the limit, an admin
path without the token, an Expect it does not know) gets that refusal instead of `100 Continue`
(and `Connection: close`: the body is not wanted); one that passes them gets `100 Continue`
and then its answer."""

from __future__ import annotations

from pathlib import Path

from tests.support.raw_http import RawResponse, connect, read_response
from tests.support.servers import fake_replicas, gateway_config, running_gateway, write_config

KEY = "sk-expect-0123456789"
LIMIT = 1000


async def _first_answer(url: str, head: bytes, body: bytes) -> tuple[RawResponse, bytes]:
    """The first answer to `head`; after a 100 the body goes out and the final status follows
    the answer (its head and body are the final answer's)."""
    reader, writer = await connect(url)
    try:
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        first = await read_response(reader)
        if first.status == 100:
            writer.write(body)
            final = await read_response(reader)
            return RawResponse(100, final.headers, final.body), str(final.status).encode()
        return first, b""  # a client that was refused closes (it cannot send another request)
    finally:
        writer.close()


def _request(target: bytes, length: int, *, key: str | None = KEY, expect: bytes = b"") -> bytes:
    lines = [b"POST %s HTTP/1.1" % target, b"Host: gw", b"Content-Length: %d" % length]
    lines.append(b"Expect: " + (expect or b"100-continue"))
    if key is not None:
        lines.append(b"Authorization: Bearer " + key.encode())
    return b"\r\n".join(lines)


async def test_refusals_come_instead_of_100_continue(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,):
        config = gateway_config(
            [replica], "round_robin", auth={"api_keys": [{"name": "a", "key": KEY}]},
            limits={"max_body_bytes": LIMIT},
        )  # fmt: skip
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml", admin_token="tok") as gw:
            cases = {
                "no key": _request(b"/v1/completions", 10, key=None),
                "wrong key": _request(b"/v1/completions", 10, key="sk-nope"),
                "models, no key": _request(b"/v1/models", 10, key=None),
                "too large": _request(b"/v1/completions", LIMIT + 1),
                "unknown expect": _request(b"/v1/completions", 10, expect=b"200-ok"),
                "admin, no token": _request(b"/admin/reload", 10, key=None),
                "admin spelling": _request(b"//admin/reload", 10, key=None),
            }
            answers = {
                name: await _first_answer(gw.url, head, b"x" * 10) for name, head in cases.items()
            }
            passed = await _first_answer(gw.url, _request(b"/v1/completions", 10), b"0123456789")
            at_limit = await _first_answer(gw.url, _request(b"/echo", LIMIT), b"y" * LIMIT)
    statuses = {
        name: (first.status, first.json()["error"]["type"]) for name, (first, _) in answers.items()
    }
    assert statuses == {
        "no key": (401, "unauthorized"),
        "wrong key": (401, "unauthorized"),
        "models, no key": (401, "unauthorized"),
        "too large": (413, "body_too_large"),
        "unknown expect": (417, "expectation_failed"),
        "admin, no token": (401, "unauthorized"),
        "admin spelling": (401, "unauthorized"),
    }
    # Refused before the body: the gateway says it will close rather than read one.
    assert all(first.headers.get("connection") == "close" for first, _ in answers.values())
    assert "limits.max_body_bytes = 1000" in answers["too large"][0].json()["error"]["message"]
    assert (passed[0].status, passed[1]) == (100, b"200")  # 100 Continue, then the answer
    assert (at_limit[0].status, at_limit[1]) == (100, b"200")
    assert [seen["body"] for seen in replica.seen] == ["0123456789", "y" * LIMIT]
