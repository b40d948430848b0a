"""Tenancy on the data path without a server: what a request used, as its last attempt tells
(the response's usage, a stream's events, a client that left, a replica that failed), and the
settlement that gives back what was not used and corrects the tenant's service."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import parse_config
from gateway.datapath.classify import NOT_GENERATIVE, Estimate
from gateway.datapath.tenancy import enter, settle, used
from gateway.flow.limits import RateLimited
from gateway.flow.service import Usage
from gateway.pool.lease import CLIENT_CLOSED, Lease
from gateway.pool.live import Live, build_runtime
from gateway.pool.replicas import ReplicaPool
from gateway.routing.request import NO_INFO

KEY = {"name": "a", "key": "sk-a", "limits": {"tokens_per_minute": 1000, "max_parallel": 2}}


def _live(**extra: object) -> Live:
    config = parse_config({"replicas": [{"url": "http://r:1"}], **extra})
    live = Live.start(build_runtime(config), ReplicaPool(config.replica_urls))
    live.swap(live.runtime)
    return live


def _lease(live: Live, code: int, streamed: int = 0, usage: Usage | None = None) -> Lease:
    lease = Lease(live.admission, live.pool.active()[0], NO_INFO)
    lease.code, lease.streamed, lease.usage = code, streamed, usage
    return lease


NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
ESTIMATE = Estimate(prompt_tokens=10, max_tokens=100)


@pytest.mark.parametrize(
    ("code", "streamed", "usage", "expected"),
    [
        (200, 0, Usage(12, 40), Usage(12, 40)),  # the response named its usage
        (200, 7, None, Usage(10, 7)),  # a stream without one: the events relayed
        (CLIENT_CLOSED, 3, None, Usage(10, 3)),  # the client left mid-stream
        (CLIENT_CLOSED, 0, None, Usage(10, 0)),  # or before the first token
        (502, 0, None, Usage()),  # the replica failed: nothing served
        (429, 0, None, Usage()),  # or refused
        (200, 0, None, None),  # a 2xx that says nothing: unknown (the reservation stands)
    ],
)
def test_what_a_request_used(
    code: int, streamed: int, usage: Usage | None, expected: Usage | None
) -> None:
    assert used(_lease(_live(), code, streamed, usage), ESTIMATE) == expected


def test_a_request_never_dispatched_used_nothing() -> None:
    assert used(None, ESTIMATE) == Usage()


def test_settlement_gives_back_what_was_not_used_and_frees_the_parallel_slot() -> None:
    live = _live(auth={"api_keys": [KEY]})
    key = live.runtime.config.auth.api_keys[0]  # type: ignore[union-attr]
    first = enter(live, key, NO_HEADERS, ESTIMATE)
    assert first.reply_headers["x-ratelimit-remaining-tokens"] == "890"  # 10 + 100 reserved
    second = enter(live, key, NO_HEADERS, ESTIMATE)
    with pytest.raises(RateLimited) as refused:  # two in flight: max_parallel
        enter(live, key, NO_HEADERS, ESTIMATE)
    assert refused.value.code == "parallel_requests"
    settle(live, first, _lease(live, 200, usage=Usage(10, 5)))  # 95 come back
    settle(live, second, None)  # never dispatched: all 110 come back
    third = enter(live, key, NO_HEADERS, NOT_GENERATIVE)
    assert int(third.reply_headers["x-ratelimit-remaining-tokens"]) in range(985, 1001)


def test_token_fairness_corrects_the_tenants_service_by_what_was_used() -> None:
    flow = {"classes": [{"name": "standard"}], "fairness": "tokens", "output_token_weight": 2}
    live = _live(flow_control=flow)
    tenancy = enter(live, None, CIMultiDict({"X-Infergate-Tenant": "t"}), ESTIMATE)
    assert tenancy.ticket.cost == 10  # the prompt, charged at dispatch
    live.admission.service.charge("t", tenancy.ticket.cost)  # as at dispatch
    settle(live, tenancy, _lease(live, 200, usage=Usage(10, 20)))
    assert live.admission.service.value("t") == pytest.approx(10 + 2 * 20, rel=1e-3)
