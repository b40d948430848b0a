"""The /cache/blocks parser: 16 lowercase hex digits a block, as our replica writes them."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.control.cache_blocks import BadReport, blocks


def test_blocks_are_read_as_64_bit_hashes() -> None:
    assert blocks({"blocks": ["0000000000000001", "ffffffffffffffff"]}) == [1, 2**64 - 1]
    assert blocks({"blocks": []}) == []


@pytest.mark.parametrize(
    "report",
    [
        None, [], "blocks", {"blocks": None}, {"blocks": {"a": 1}},
        {"blocks": [1]}, {"blocks": ["1"]}, {"blocks": ["f" * 17]}, {"blocks": ["F" * 16]},
        {"blocks": ["\u0663" * 16]}, {"blocks": ["0x" + "0" * 14]}, {"blocks": [" " + "0" * 15]},
        {"blocks": ["0" * 16, None]},
    ],
)  # fmt: skip
def test_anything_else_is_a_bad_report(report: Any) -> None:
    with pytest.raises(BadReport):
        blocks(report)
