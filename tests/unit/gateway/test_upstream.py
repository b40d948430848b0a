"""The upstream URL is built from the replica's origin and the request's path and query: no
request target can name another host (issue 13, B.4)."""

from __future__ import annotations

import pytest

from gateway.upstream import upstream_url


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
