"""The upstream URL is built from the replica's origin and the request's path and query: no
request target can name another host (issue 13, B.4), nor climb out of the replica URL's path
prefix with a dot segment (issue 30, B.9)."""

from __future__ import annotations

import pytest

from gateway.datapath.h1client import _head, dot_segment, origin_of
from gateway.datapath.relay import frame_chunk
from gateway.datapath.transport import UpstreamFailure
from gateway.datapath.upstream import upstream_url


@pytest.mark.parametrize(
    "target",
    ["//evil.example/x", "/x@evil.example:1/", "/@evil.example", "/%2F%2Fevil.example/x?a=b"],
)
def test_no_target_changes_the_host(target: str) -> None:
    url = upstream_url("http://127.0.0.1:9001", target)
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 9001)
    assert url.raw_path_qs == target


def test_a_replica_url_with_a_path_prefix_keeps_it() -> None:
    url = upstream_url("http://[::1]:9001/base/", "/v1/completions?x=%20")
    assert str(url) == "http://[::1]:9001/base/v1/completions?x=%20"


DOT_SEGMENTS = [
    "/../tenant-b/v1/completions",
    "/v1/..",
    "/v1/./completions",
    "/v1/%2e%2E/tenant-b",
    "/v1/.%2e/tenant-b",
    "/v1/..%2ftenant-b",
    "/v1/..%5Ctenant-b",
    "/v1\\..\\tenant-b",
    "/v1/..;x=1/tenant-b",
]


@pytest.mark.parametrize("target", DOT_SEGMENTS)
def test_no_dot_segment_leaves_the_replica_path_prefix(target: str) -> None:
    assert dot_segment(target + "?q=1")
    with pytest.raises(ValueError, match=r"'\.\.' segment"):
        upstream_url("http://127.0.0.1:9001/tenant-a", target)
    with pytest.raises(UpstreamFailure, match="dot segment"):
        origin = origin_of("http://127.0.0.1:9001/tenant-a")
        _head("GET", origin, target, [], b"")


@pytest.mark.parametrize(
    "target", ["/v1/completions", "/v2/models/llama-3.1/infer", "/v1/...", "/v1/.well", "/x?a=/../"]
)
def test_dots_that_are_not_segments_pass(target: str) -> None:
    assert not dot_segment(target)
    assert upstream_url("http://127.0.0.1:9001/tenant-a", target).raw_path_qs.endswith(target)


def test_a_piped_chunk_is_framed_as_http_1_1_chunks_are() -> None:
    assert frame_chunk(b"hello") == b"5\r\nhello\r\n"
    assert frame_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
