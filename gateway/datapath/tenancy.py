"""Tenancy: between classify and admission, a request's place in the fleet. Its ticket (tenant,
class, weight, and its prompt tokens, charged to the tenant when it is dispatched:
gateway/flow/identity.py) orders it in the gateway queue; its key's limits are reserved
(gateway/flow/limits.py: 429 at once when over) and held through every attempt until `settle`,
which gives back what the response did not use.

What a request used: the response's `usage` (a whole body, or a stream's usage chunk); for a
stream without one, its prompt's estimate plus the events relayed (a client that leaves settles
what reached it); a replica's failure or refusal, nothing; a 2xx that names no usage keeps its
reservation. The same tokens complete the tenant's service under `fairness: tokens` (its
completion, weighted, and any error in the prompt's estimate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import ApiKey, GatewayConfig
from gateway.datapath.classify import CHARS_PER_TOKEN, NOT_GENERATIVE, Estimate
from gateway.flow.identity import CLASS_HEADER, ticket
from gateway.flow.limits import Reservation
from gateway.flow.queue import DEFAULT_TICKET, Ticket
from gateway.flow.service import Usage
from gateway.pool.lease import CLIENT_CLOSED, Lease
from gateway.pool.live import Live


@dataclass(slots=True)
class Tenancy:
    ticket: Ticket
    estimate: Estimate
    reservation: Reservation | None
    reply_headers: dict[str, str]  # x-ratelimit-* and X-Infergate-Class, on every reply
    output_weight: float  # flow_control.output_token_weight, for the service correction
    wants_usage: bool = False  # the relay reads the response's usage (limits, token fairness)


NO_TENANCY = Tenancy(DEFAULT_TICKET, NOT_GENERATIVE, None, {}, 1.0)


def wants_estimate(config: GatewayConfig, key: ApiKey | None) -> bool:
    """The request's tokens are needed before it runs: a tokens_per_minute limit reserves them."""
    return key is not None and key.limits is not None and key.limits.tokens_per_minute is not None


def enter(
    live: Live,
    key: ApiKey | None,
    headers: Mapping[str, str],
    estimate: Estimate | None,
    body_bytes: int = 0,
) -> Tenancy:
    """The request's ticket and its key's reservation: InvalidRequest for a tenant or class
    header that cannot be used, RateLimited (429) over a limit. Without flow control and key
    limits there is nothing to do (NO_TENANCY)."""
    config = live.runtime.config
    flow = config.flow_control
    limits = key.limits if key is not None else None
    if flow is None and limits is None:
        return NO_TENANCY
    estimate = estimate or NOT_GENERATIVE
    output_weight = flow.output_token_weight if flow is not None else 1.0
    # Charged to its tenant when dispatched: the prompt, prefilled at once (its estimate, or
    # the body's size in tokens when nothing parsed it); the completion is charged as it is
    # served, when the request ends (`settle`), with the prompt's estimate corrected, so the
    # service a tenant has attained is what it was served, not what it asked for.
    prompt = estimate.prompt_tokens or body_bytes // CHARS_PER_TOKEN
    place = ticket(flow, key, headers, float(max(1, prompt)))
    fair = flow is not None and flow.fairness == "tokens"
    reply: dict[str, str] = {CLASS_HEADER: place.class_name} if flow is not None else {}
    reservation = None
    if key is not None and limits is not None:
        generative = estimate is not NOT_GENERATIVE
        tokens = estimate.total(limits.default_max_tokens) if generative else 0
        reservation = live.limiter.reserve(key.name, limits, tokens)
        reply.update(reservation.headers())
    wants_usage = reservation is not None or fair
    if estimate is NOT_GENERATIVE and prompt:  # what settles a stream without usage
        estimate = Estimate(prompt, None)
    return Tenancy(place, estimate, reservation, reply, output_weight, wants_usage)


def used(lease: Lease | None, estimate: Estimate) -> Usage | None:
    """What the request used, as its last attempt tells; None: unknown (a 2xx naming none)."""
    if lease is None:
        return Usage()
    if lease.usage is not None:
        return lease.usage
    if lease.streamed:
        return Usage(estimate.prompt_tokens, lease.streamed)
    if lease.code == CLIENT_CLOSED:
        return Usage(estimate.prompt_tokens)
    if lease.code >= 400:  # the replica refused it or failed: nothing served
        return Usage()
    return None


def settle(live: Live, tenancy: Tenancy, lease: Lease | None) -> Usage | None:
    """The request is over: its reservation settles and its tenant's service is corrected by
    what it used. Returns that (None: unknown)."""
    if tenancy is NO_TENANCY:
        return None
    usage = used(lease, tenancy.estimate)
    if tenancy.reservation is not None:
        tenancy.reservation.settle(None if usage is None else usage.prompt + usage.completion)
    flow = live.runtime.config.flow_control
    dispatched = lease is not None  # its tenant was charged its prompt then
    if usage is not None and dispatched and flow is not None and flow.fairness == "tokens":
        correction = usage.weighted(tenancy.output_weight) - tenancy.ticket.cost
        live.admission.service.charge(tenancy.ticket.tenant, correction)
    return usage
