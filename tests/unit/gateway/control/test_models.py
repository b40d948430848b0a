"""The /v1/models parser, on recorded and hostile answers: what a replica says it serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.control.models import MAX_MODELS_PER_REPLICA, Served, cards_of, read_models
from gateway.control.probe import PROBE_FAILURES

ANSWERS = Path(__file__).parent / "answers"


def test_openais_list_gives_every_entry() -> None:
    served = read_models(200, (ANSWERS / "openai_models.json").read_bytes())
    assert served is not None and served.cards is not None
    assert [card["id"] for card in served.cards] == ["gpt-4o-mini", "text-embedding-3-small"]
    assert served.cards[0]["owned_by"] == "system"


def test_vllms_list_gives_its_lora_adapters_with_their_parent_without_permissions() -> None:
    served = read_models(200, (ANSWERS / "vllm_lora_models.json").read_bytes())
    assert served is not None and served.cards is not None
    base, adapter = served.cards
    assert base["id"] == "meta-llama/Llama-3.1-8B-Instruct" and base["max_model_len"] == 131072
    assert adapter == {
        "id": "sql-lora", "object": "model", "created": 1735689600, "owned_by": "vllm",
        "root": "/adapters/sql-lora", "parent": "meta-llama/Llama-3.1-8B-Instruct",
        "max_model_len": None,
    }  # fmt: skip
    assert all("permission" not in card for card in served.cards)


def test_no_endpoint_is_open_to_any_model_and_other_statuses_say_nothing() -> None:
    assert read_models(404, b"") == Served(None) == read_models(405, b"")
    for status in (500, 503, 401, 302):
        assert read_models(status, b"") is None


def test_entries_that_are_no_model_are_skipped_and_a_long_list_is_cut() -> None:
    assert cards_of(
        {"object": "list", "data": [{"id": "m", "permission": [1]}, {"id": 3}, "x"]}
    ) == [{"id": "m"}]
    assert cards_of({"data": [{"id": ""}, {"id": None}, {"name": "m"}, [], 1e309]}) == []
    assert cards_of({"data": "nope"}) is None and cards_of([1]) is None
    many = json.dumps({"data": [{"id": f"m{i}"} for i in range(5000)]}).encode()
    served = read_models(200, many)
    assert served is not None and served.cards is not None
    assert len(served.cards) == MAX_MODELS_PER_REPLICA


@pytest.mark.parametrize(
    "body", [b"[1, 2]", b'{"data": null}', b'{"object": "list"}', b'"models"', b"null"]
)
def test_json_that_is_no_model_list_says_nothing(body: bytes) -> None:
    assert read_models(200, body) is None


def test_duplicate_keys_take_the_last() -> None:
    served = read_models(200, b'{"data": [{"id": "a"}], "data": [{"id": "b"}]}')
    assert served is not None and served.cards == [{"id": "b"}]


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"data": [{"id": "\xff\xfe"}]}',
        b'{"data": [{"id": "m"}',
        b"<!DOCTYPE html><html><title>Login</title></html>",
        b'{"data": [{"id": "m", "created": ' + b"1" * 5000 + b"}]}",
        b"",
    ],
    ids=["deep", "not-utf8", "truncated", "html", "huge-int", "empty"],
)
def test_a_hostile_list_raises_one_of_the_probe_failures(body: bytes) -> None:
    with pytest.raises(PROBE_FAILURES):
        read_models(200, body)
