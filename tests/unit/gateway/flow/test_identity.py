"""Who a request is from: the key's tenant and class, a header that may lower the class but
never raise it, and the headers trusted without auth."""

from __future__ import annotations

import re

import pytest

from gateway.config import ApiKey, FlowControl
from gateway.errors import InvalidRequest
from gateway.flow.identity import CLASS_HEADER, TENANT_HEADER, ticket

FLOW = FlowControl.model_validate(
    {
        "classes": [{"name": "interactive"}, {"name": "standard"}, {"name": "batch"}],
        "default_class": "standard",
    }
)


def _key(**fields: object) -> ApiKey:
    return ApiKey.model_validate({"name": "team-a", "key": "secret", **fields})


def test_a_key_names_its_tenant_class_and_weight() -> None:
    got = ticket(FLOW, _key(tenant="acme", **{"class": "interactive"}, weight=3), {}, 10.0)
    assert (got.tenant, got.class_name, got.rank, got.weight, got.cost) == (
        "acme", "interactive", 0, 3.0, 10.0,
    )  # fmt: skip
    plain = ticket(FLOW, _key(), {}, 1.0)
    assert (plain.tenant, plain.class_name) == ("team-a", "standard")


def test_a_key_cannot_raise_its_class_but_may_lower_it() -> None:
    key = _key(**{"class": "standard"})
    assert ticket(FLOW, key, {CLASS_HEADER: "interactive"}, 1.0).class_name == "standard"
    assert ticket(FLOW, key, {CLASS_HEADER: "batch"}, 1.0).class_name == "batch"
    default_key = _key()  # no class: the default is its ceiling
    assert ticket(FLOW, default_key, {CLASS_HEADER: "interactive"}, 1.0).class_name == "standard"


def test_a_key_ignores_the_tenant_header() -> None:
    assert ticket(FLOW, _key(), {TENANT_HEADER: "someone-else"}, 1.0).tenant == "team-a"


def test_without_auth_the_headers_are_trusted() -> None:
    got = ticket(FLOW, None, {TENANT_HEADER: "bob", CLASS_HEADER: "interactive"}, 1.0)
    assert (got.tenant, got.class_name) == ("bob", "interactive")
    anonymous = ticket(FLOW, None, {}, 1.0)
    assert (anonymous.tenant, anonymous.class_name) == ("default", "standard")


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({CLASS_HEADER: "gold"}, "is not a class of this gateway (interactive, standard, batch)"),
        ({TENANT_HEADER: "a b"}, "is not a tenant name"),
        ({TENANT_HEADER: "x" * 65}, "is not a tenant name"),
    ],
)
def test_a_header_that_cannot_be_used_is_a_400_saying_why(
    headers: dict[str, str], says: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(says)):
        ticket(FLOW, None, headers, 1.0)


def test_without_flow_control_every_request_is_one_class() -> None:
    got = ticket(None, _key(**{"limits": {"max_parallel": 1}}), {CLASS_HEADER: "gold"}, 1.0)
    assert (got.rank, got.tenant) == (0, "team-a")
