"""What the proxy tells a tracer about one request: its start and end, each attempt's routing
decision and exchange with a replica. gateway/ops/tracing.py implements it with OpenTelemetry
when `tracing:` is configured; without it the proxy holds no tracer and makes none of these
calls (`Proxy.tracer is None`: one check a request, no object made).

Each attempt hands the replica its own `traceparent` (and `tracestate`): the client's, when
there is a tracer, is the parent of the request's span and is not forwarded as it came.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from gateway.flow.service import Usage
from gateway.routing.request import Decision

if TYPE_CHECKING:
    from gateway.datapath.downstream import Downstream

TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


class AttemptTrace(Protocol):
    """One attempt on one replica (a client span)."""

    def headers(self) -> Sequence[tuple[str, str]]:
        """The trace context the replica gets: `traceparent` and, if any, `tracestate`."""
        ...

    def first_chunk(self) -> None:
        """A stream's first bytes reached the client (its time to first token)."""

    def failed(self, reason: str, message: str) -> None:
        """The attempt failed (`reason`: a retries.retry_on name, or why it was cut)."""

    def end(self, status: int) -> None:
        """The attempt is over; `status`: what the client got of it (499: it left)."""


class RequestTrace(Protocol):
    """One proxied request (a server span)."""

    @property
    def sampled(self) -> bool:
        """The trace is recorded: worth the candidates' scores and the response's usage."""
        ...

    def classified(self, model: str | None, request_id: str) -> None:
        """The model it asks for, as the client named it, and its request id."""

    def attempt(self, number: int, decision: Decision, since_ns: int) -> AttemptTrace:
        """Attempt `number` (1 the first) goes where `decision` says, after waiting for a
        replica since `since_ns` (time.time_ns(): admission and, if it queued, the queue)."""
        ...

    def end(self, status: int, usage: Usage | None) -> None:
        """The request is over: the status the client got, the tokens it used (None: not
        known)."""


class Tracer(Protocol):
    def request(self, request: Downstream) -> RequestTrace:
        """A trace for a request that has just arrived (its parent: the client's traceparent)."""
        ...


def with_trace(
    headers: list[tuple[str, str]], context: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The upstream headers with the client's trace context replaced by the attempt's."""
    kept = [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS]
    kept.extend(context)
    return kept
