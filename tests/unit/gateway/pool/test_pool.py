"""The pool owns replica state: counts survive list changes; removed replicas drain."""

from __future__ import annotations

import math

import pytest

from gateway.pool.replicas import MAX_REPORT_KEYS, ReplicaPool, load_report, parse_load_report

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def test_update_keeps_counts_of_kept_replicas() -> None:
    pool = ReplicaPool([A, B])
    a = pool.available()[0]
    pool.acquire(a)
    pool.update([B, A, C])
    assert pool.get(A) is a and a.outstanding == 1
    assert [r.url for r in pool.available()] == [B, A, C]


def test_removed_replica_drains_until_its_last_request_ends() -> None:
    pool = ReplicaPool([A, B])
    a = pool.get(A)
    assert a is not None
    pool.acquire(a)
    pool.update([B])
    assert a.draining and a not in pool.available() and a in pool.all()
    pool.release(a, outcome="served")
    assert a not in pool.all()


def test_removed_then_restored_replica_is_the_same_object() -> None:
    pool = ReplicaPool([A])
    a = pool.get(A)
    assert a is not None
    pool.acquire(a)
    pool.update([B])
    pool.update([A, B])
    assert pool.get(A) is a and not a.draining and a.outstanding == 1


def test_unhealthy_replicas_are_not_available() -> None:
    pool = ReplicaPool([A, B])
    a = pool.get(A)
    assert a is not None
    pool.set_healthy(a, False)
    assert [r.url for r in pool.available()] == [B]
    pool.set_healthy(a, True)
    assert len(pool.available()) == 2


def test_failures_are_counted() -> None:
    pool = ReplicaPool([A])
    a = pool.available()[0]
    pool.acquire(a)
    pool.release(a, outcome="failed")
    assert (a.outstanding, a.requests_total, a.errors_total) == (0, 1, 1)


def test_load_reports_keep_counts_and_shares_and_skip_the_rest() -> None:
    report = parse_load_report("queued=1,running=4,inflight=5,kv_usage=0.125,x=-1,y=1e9,z=.5,w=2.5")
    assert report == {"queued": 1, "running": 4, "inflight": 5, "kv_usage": 0.125, "z": 0.5}


@pytest.mark.parametrize(
    "value",
    ["\u00b2", "\u00b9\u00b3", "\u0663", "\uff11", "9" * 5000, "9" * 17, str(2**53), "-1", "+1",
     "1_000", "1e3", "0x10", "1.5", ".\u0663", "0.\u00b2", "", " "],
)  # fmt: skip
def test_a_load_header_value_is_read_by_ascii_digits_only(value: str) -> None:
    assert parse_load_report(f"inflight={value},queued=2") == {"queued": 2}


def test_a_load_header_holds_at_most_32_keys_of_plain_names() -> None:
    many = ",".join(f"k{i}={i}" for i in range(100))
    assert len(parse_load_report(many)) == MAX_REPORT_KEYS
    assert parse_load_report("in\u00b2=1,a b=2,=3,inflight=4") == {"inflight": 4}


def test_load_report_values_are_whole_counts_or_shares() -> None:
    values = {
        "inflight": 3, "queued": 2.0, "kv_usage": 1, "ratio": 0.5,
        "bool": True, "nan": math.nan, "inf": math.inf, "negative": -1, "huge": 2**53,
        "text": "3", "nested": {"a": 1}, "list": [1], "fraction": 2.5, "x\u00b2": 1,
    }  # fmt: skip
    assert load_report(values) == {"inflight": 3, "queued": 2, "kv_usage": 1.0, "ratio": 0.5}
    assert load_report({"kv_usage": 7}) == {}
