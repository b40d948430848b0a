"""The gateway's OpenAPI document names the batch endpoints the jobs API takes."""

from gateway.jobs.model import BATCH_ENDPOINTS
from gateway.ops import openapi


def test_the_document_lists_the_endpoints_a_batch_may_name() -> None:
    assert tuple(openapi.BATCH_ENDPOINTS) == BATCH_ENDPOINTS
