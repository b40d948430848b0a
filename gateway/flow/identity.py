"""Who a request is from, as flow control sees it: its tenant, its class and its tenant's weight
(a Ticket for the queue), from its API key and two headers.

- Tenant: the key's `tenant` (default: the key's name). Without `auth`, the
  `X-Infergate-Tenant` header, trusted as sent: only behind something that authenticates
  clients and sets it. Else `default`.
- Class: the key's `class` (default: flow_control.default_class); `X-Infergate-Class` may ask
  for a less important one, never a more important one (it is clamped to the key's). Without
  `auth` the header chooses any class. The effective class goes back in the same header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gateway.config import ApiKey, FlowControl
from gateway.errors import InvalidRequest, clipped
from gateway.flow.queue import Ticket

TENANT_HEADER = "X-Infergate-Tenant"
CLASS_HEADER = "X-Infergate-Class"
DEFAULT_TENANT = "default"
_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


def ticket(
    flow: FlowControl | None, key: ApiKey | None, headers: Mapping[str, str], cost: float
) -> Ticket:
    """The request's ticket; InvalidRequest (400) for a tenant or class header that cannot be
    used (a name of other characters, a class this gateway does not have)."""
    tenant = key.tenant_name if key is not None else _tenant_header(headers)
    if flow is None:  # one class: the tenant only names the request in metrics
        weight = key.weight if key is not None else 1.0
        return Ticket(tenant, "", 0, weight, cost)
    default = flow.rank(flow.default)
    ceiling = 0  # without auth the header is trusted
    if key is not None:
        ceiling = default if key.class_ is None else flow.rank(key.class_)
    asked = headers.get(CLASS_HEADER)
    if asked is None:
        rank = ceiling if key is not None else default
    else:
        wanted = flow.rank(asked.strip())
        if wanted < 0:
            names = ", ".join(c.name for c in flow.classes)
            raise InvalidRequest(
                f"{CLASS_HEADER}: '{clipped(asked)}' is not a class of this gateway ({names})"
            )
        rank = max(wanted, ceiling)
    weight = key.weight if key is not None else 1.0
    return Ticket(tenant, flow.classes[rank].name, rank, weight, cost)


def _tenant_header(headers: Mapping[str, str]) -> str:
    value = headers.get(TENANT_HEADER)
    if value is None:
        return DEFAULT_TENANT
    value = value.strip()
    if not _NAME.fullmatch(value):
        raise InvalidRequest(
            f"{TENANT_HEADER}: '{clipped(value)}' is not a tenant name: 1 to 64 letters, "
            "digits or _.:@-"
        )
    return value
