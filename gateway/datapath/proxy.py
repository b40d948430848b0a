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
from gateway.datapath.classify import Classified, Estimate, classify_off_loop
from gateway.datapath.downstream import AiohttpDownstream, Downstream
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
    """aiohttp's route for every path that is not the gateway's own (the lean front of
    gateway/app/front.py calls `serve` itself)."""
    client = AiohttpDownstream(request)
    await serve(request.app[PROXY], client)
    assert client.response is not None, "every way out of serve answers or raises"
    return client.response


async def serve(proxy: Proxy, client: Downstream) -> None:
    """One proxied request, answered through `client`; a GatewayError raised before any of the
    answer was sent is for the front end to answer (JSON, by checks.refusal's rules)."""
    if dot_segment(client.path_qs):  # before admission: it counts nowhere
        raise InvalidRequest(f"the request path {DOT_SEGMENT_PROBLEM}")
    last: list[Lease] = []  # the last attempt's lease: what the request used
    if proxy.tracer is None:
        return await _handle(client, proxy, last, None)
    trace = proxy.tracer.request(client)
    status = 500
    try:
        await _handle(client, proxy, last, trace)
        status = last[-1].code if last else 200
    except GatewayError as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        trace.end(status, last[-1].usage if last else None)


async def _handle(
    client: Downstream, proxy: Proxy, last: list[Lease], trace: RequestTrace | None
) -> None:
    live = proxy.live
    config = live.runtime.config
    body = await client.body(config.limits.max_body_bytes, config.timeouts.client_body_s)
    request_id = client.headers.get(REQUEST_ID_HEADER) or new_request_id()
    estimate = tenancy_step.wants_estimate(config, client.key)
    try:
        # An alias is rewritten to the served model: in the body, or in a /v2/models/{name} path.
        asked = await classify_off_loop(live, client.path_qs, client.headers, body, estimate)
    except GatewayError as exc:  # an unknown model, or none of its replicas in rotation
        proxy.events.unrouted(exc.error_type)
        raise
    if trace is not None:
        trace.classified(asked.asked, request_id)
    tenancy = _enter(client, proxy, asked.estimate, len(body))
    try:
        await _attempts(client, proxy, asked, request_id, tenancy, last, trace)
    except GatewayError as exc:  # an error of the gateway's own still carries the headers
        exc.headers = {**tenancy.reply_headers, **exc.headers}
        raise
    finally:
        usage = tenancy_step.settle(live, tenancy, last[-1] if last else None)
        proxy.events.settled(tenancy.ticket, usage)


def _enter(client: Downstream, proxy: Proxy, estimate: Estimate | None, body_bytes: int) -> Tenancy:
    key = client.key
    try:
        return tenancy_step.enter(proxy.live, key, client.headers, estimate, body_bytes)
    except RateLimited as exc:
        proxy.events.rate_limited(key.tenant_name if key is not None else "", exc.code)
        raise


async def _attempts(
    client: Downstream,
    proxy: Proxy,
    asked: Classified,
    request_id: str,
    tenancy: Tenancy,
    last: list[Lease],
    trace: RequestTrace | None = None,
) -> None:
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
                lease.key = client.key_name
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
                return await _attempt(client, proxy, lease, sent, retry, config)
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
    if failure.response is None:
        raise failure.error
    await client.reply(failure.response)  # the replica's own 429/503, Retry-After and all


async def _attempt(
    client: Downstream,
    proxy: Proxy,
    lease: Lease,
    sent: Outgoing,
    retry: bool,
    config: GatewayConfig,
) -> None:
    """One try on the leased replica; sets the lease's code to what the client got (and tells
    the attempt's trace, if any, how it went)."""
    proxy.retries_in_flight += retry
    trace = sent.trace
    try:
        upstream, pool = proxy.upstream(), proxy.live.pool
        lease.code = await relay(client, lease, sent, upstream, config.timeouts, pool)
    except AttemptFailed as failed:
        lease.code = failed.status
        if trace is not None:
            trace.failed(failed.reason, str(failed))
        raise
    except RelayAborted as exc:
        lease.code = 502
        if trace is not None:
            trace.failed("aborted", str(exc))
        await cut(client, exc)
    except ClientGone:
        lease.code = CLIENT_CLOSED
    finally:
        proxy.retries_in_flight -= retry
        if trace is not None:
            if lease.broken:
                trace.failed("stream_error", "the replica's stream ended with an error event")
            trace.end(lease.code)
