"""The proxy: one client request from its arrival to its last attempt. It reads the body
(datapath/body.py), classifies it once (datapath/classify.py: its model, what its policy
needs), then makes attempts: each is one admission lease, which decides where (and whether) it
goes and records its outcome when it ends, and one exchange relayed to the client
(datapath/relay.py). A failed attempt is retried on another replica while no response byte
has reached the client, within `retries` and the retry budget. With a tracer (`tracing:`), the
request, each routing decision and each attempt are told to it (datapath/trace.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.config import GatewayConfig, Retries
from gateway.datapath import tenancy as tenancy_step
from gateway.datapath.auth import api_key, key_name
from gateway.datapath.body import read_body
from gateway.datapath.classify import Classified, Estimate, classify_off_loop
from gateway.datapath.h1client import DOT_SEGMENT_PROBLEM, dot_segment
from gateway.datapath.headers import (
    DECISION_HEADER,
    REQUEST_ID_HEADER,
    explained,
    new_request_id,
)
from gateway.datapath.relay import (
    AttemptFailed,
    ClientGone,
    Outgoing,
    RelayAborted,
    cut,
    relay,
)
from gateway.datapath.tenancy import Tenancy
from gateway.datapath.trace import RequestTrace, Tracer
from gateway.datapath.transport import Upstream
from gateway.errors import GatewayError, InvalidRequest
from gateway.flow.limits import RateLimited
from gateway.flow.queue import Ticket
from gateway.flow.service import Usage
from gateway.pool.admission import NoUntriedReplica
from gateway.pool.lease import CLIENT_CLOSED, Lease
from gateway.pool.live import Live
from gateway.routing.replica import Replica


class ProxyEvents:
    """What the proxy reports as it goes (gateway/ops/metrics.py counts it); no-ops here."""

    def settled(self, ticket: Ticket, usage: Usage | None) -> None:
        """A request ended, with the tokens it used (None: unknown)."""

    def rate_limited(self, tenant: str, code: str) -> None:
        """A request of `tenant` refused by its key's limits (`code`: which)."""

    def unrouted(self, reason: str) -> None:
        """A request answered by the gateway without reaching a replica (`reason`: its type)."""

    def retried(self, reason: str) -> None:
        """A request sent again to another replica after `reason` (a retries.retry_on name)."""

    def retry_refused(self) -> None:
        """A retry not made: the retry budget was spent."""


@dataclass(eq=False)
class Proxy:
    """What the proxy holds across requests: the gateway in force, its upstream client (opened
    with the app), where it reports, the retries in flight (for the retry budget), and the
    tracer (set while the app runs, with `tracing:`)."""

    live: Live
    upstream: Callable[[], Upstream]
    events: ProxyEvents = field(default_factory=ProxyEvents)
    retries_in_flight: int = 0
    tracer: Tracer | None = None

    def retry_allowed(self, retries: Retries) -> bool:
        """Envoy-style retry budget: retries in flight stay under a share of all requests."""
        share = retries.budget_percent / 100 * self.live.pool.outstanding
        return self.retries_in_flight < max(retries.min_retry_concurrency, share)


PROXY = web.AppKey("proxy", Proxy)
UPSTREAM = web.AppKey("upstream", Upstream)  # opened with the app (h1client.UpstreamPool)


async def handle(request: web.Request) -> web.StreamResponse:
    """Every path that is not the gateway's own ends here."""
    if dot_segment(request.rel_url.raw_path_qs):  # before admission: it counts nowhere
        raise InvalidRequest(f"the request path {DOT_SEGMENT_PROBLEM}")
    proxy = request.app[PROXY]
    last: list[Lease] = []  # the last attempt's lease: what the request used
    if proxy.tracer is None:
        return await _handle(request, proxy, last, None)
    trace = proxy.tracer.request(request)
    status = 500
    try:
        response = await _handle(request, proxy, last, trace)
        status = last[-1].code if last else response.status
        return response
    except GatewayError as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        trace.end(status, last[-1].usage if last else None)


async def _handle(
    request: web.Request, proxy: Proxy, last: list[Lease], trace: RequestTrace | None
) -> web.StreamResponse:
    live = proxy.live
    config = live.runtime.config
    body = await read_body(request, config.limits.max_body_bytes, config.timeouts.client_body_s)
    request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
    estimate = tenancy_step.wants_estimate(config, api_key(request))
    try:
        # An alias is rewritten to the served model: in the body, or in a /v2/models/{name} path.
        path_qs, headers = request.rel_url.raw_path_qs, request.headers
        asked = await classify_off_loop(live, path_qs, headers, body, estimate)
    except GatewayError as exc:  # an unknown model, or none of its replicas in rotation
        proxy.events.unrouted(exc.error_type)
        raise
    if trace is not None:
        trace.classified(asked.asked, request_id)
    tenancy = _enter(request, proxy, asked.estimate, len(body))
    try:
        return await _attempts(request, proxy, asked, request_id, tenancy, last, trace)
    except GatewayError as exc:  # an error of the gateway's own still carries the headers
        exc.headers = {**tenancy.reply_headers, **exc.headers}
        raise
    finally:
        usage = tenancy_step.settle(live, tenancy, last[-1] if last else None)
        proxy.events.settled(tenancy.ticket, usage)


def _enter(
    request: web.Request, proxy: Proxy, estimate: Estimate | None, body_bytes: int
) -> Tenancy:
    key = api_key(request)
    try:
        return tenancy_step.enter(proxy.live, key, request.headers, estimate, body_bytes)
    except RateLimited as exc:
        proxy.events.rate_limited(key.tenant_name if key is not None else "", exc.code)
        raise


async def _attempts(
    request: web.Request,
    proxy: Proxy,
    asked: Classified,
    request_id: str,
    tenancy: Tenancy,
    last: list[Lease],
    trace: RequestTrace | None = None,
) -> web.StreamResponse:
    """The request's attempts, each on a replica of its own, while a retry may follow."""
    live, config = proxy.live, proxy.live.runtime.config
    body, path_qs, info = asked.body, asked.path_qs, asked.info
    tried: list[Replica] = []
    failure: AttemptFailed | None = None
    sampled = trace is not None and trace.sampled  # its decisions' scores and usage are told
    for attempt in range(config.retries.max_attempts):
        if failure is not None and not proxy.retry_allowed(config.retries):
            proxy.events.retry_refused()
            break
        since_ns = time.time_ns() if trace is not None else 0
        try:
            async with live.admission.lease(
                info, tried=tried, ticket=tenancy.ticket, explain=sampled
            ) as lease:
                last.append(lease)
                lease.key = key_name(request)
                lease.wants_usage = tenancy.wants_usage or sampled
                tried.append(lease.replica)
                retry = attempt > 0
                replies = tenancy.reply_headers
                if live.admission.explain:
                    replies = {**replies, DECISION_HEADER: explained(lease.decision)}
                tried_here = None
                if trace is not None:
                    tried_here = trace.attempt(attempt + 1, lease.decision, since_ns)
                sent = Outgoing(path_qs, body, request_id, replies, tried_here)
                return await _attempt(request, proxy, lease, sent, retry, config)
        except NoUntriedReplica:
            break
        except GatewayError as exc:  # from admission: nowhere to go now
            if failure is not None:
                break  # the first failure says more than "nowhere left to retry"
            proxy.events.unrouted(exc.error_type)
            raise
        except AttemptFailed as failed:
            failure = failed
            if failed.reason not in config.retries.retry_on:
                break
            if attempt + 1 < config.retries.max_attempts:
                proxy.events.retried(failed.reason)
    assert failure is not None
    if failure.response is not None:
        return failure.response  # the replica's own 429/503, Retry-After and all
    raise failure.error


async def _attempt(
    request: web.Request,
    proxy: Proxy,
    lease: Lease,
    sent: Outgoing,
    retry: bool,
    config: GatewayConfig,
) -> web.StreamResponse:
    """One try on the leased replica; sets the lease's code to what the client got (and tells
    the attempt's trace, if any, how it went)."""
    proxy.retries_in_flight += retry
    trace = sent.trace
    try:
        client, pool = proxy.upstream(), proxy.live.pool
        response = await relay(request, lease, sent, client, config.timeouts, pool)
        lease.code = response.status
        return response
    except AttemptFailed as failed:
        lease.code = failed.status
        if trace is not None:
            trace.failed(failed.reason, str(failed))
        raise
    except RelayAborted as exc:
        lease.code = 502
        if trace is not None:
            trace.failed("aborted", str(exc))
        await cut(request, exc.response, str(exc))
        return exc.response
    except ClientGone as exc:
        lease.code = CLIENT_CLOSED
        return exc.response
    finally:
        proxy.retries_in_flight -= retry
        if trace is not None:
            if lease.broken:
                trace.failed("stream_error", "the replica's stream ended with an error event")
            trace.end(lease.code)
