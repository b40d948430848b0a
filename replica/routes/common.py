"""Small helpers every route module uses: the state, a length read from a header, the request's
trace. (Bodies are read in replica/request_body.py.)"""

from __future__ import annotations

import re

from aiohttp import web

from replica.api.kserve import HEADER_LENGTH
from replica.errors import BadRequest
from replica.generation import FinishHook
from replica.keys import STATE
from replica.state import ReplicaState

# A length in a header: ASCII digits only (str.isdigit also takes superscripts and other
# scripts' digits, which int() refuses or reads), and few enough for int()'s 4,300-digit limit.
LENGTH = re.compile(r"[0-9]{1,18}")


class RequestTrace:
    """What a route tells its request's trace (replica/tracing.py, with `tracing:`); a request
    that is not traced has none (TRACE is not set)."""

    def generation(self, model: str, batcher: str) -> FinishHook:
        """The hook each of its sequences calls as it finishes (GenRequest.on_finish)."""
        raise NotImplementedError


TRACE = web.RequestKey("trace", RequestTrace)


def state(request: web.Request) -> ReplicaState:
    return request.app[STATE]


def binary_header_length(request: web.Request, body_size: int) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    if not LENGTH.fullmatch(raw) or int(raw) > body_size:
        raise BadRequest(f"{HEADER_LENGTH}: must be an integer no larger than the body")
    return int(raw)
