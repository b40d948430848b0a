"""Model-name routing's parts: what model a request names, what the pool knows each replica
serves, and the `models:` config rules."""

from __future__ import annotations

import json
import re

import pytest

from gateway.config import ConfigError, parse_config
from gateway.datapath.classify import parse_body
from gateway.datapath.models import requested
from gateway.pool.replicas import ReplicaPool


def asked(path: str, body: bytes) -> str | None:
    return requested(path, lambda: parse_body(body))


def test_the_model_comes_from_the_json_body_on_openai_paths_and_from_v2_paths() -> None:
    body = json.dumps({"model": "llama", "prompt": "hi"}).encode()
    assert asked("/v1/completions", body) == "llama"
    assert asked("/v1/chat/completions", b'  {"model": "m", "messages": []}') == "m"
    assert asked("/v2/models/resnet/infer", b"") == "resnet"
    assert asked("/v2/models/a b/infer", b"") == "a b"  # the path as decoded
    for path, raw in [
        ("/invocations", body),  # SageMaker: no model, any replica
        ("/v1/completions", b"not json"),
        ("/v1/completions", b"[1, 2]"),
        ("/v1/completions", json.dumps({"model": 7}).encode()),
        ("/v1/completions", json.dumps({"model": ""}).encode()),
        ("/v1/completions", b""),
        ("/v2/models/", b""),
    ]:
        assert asked(path, raw) is None, (path, raw)


def test_the_pool_knows_who_serves_what_and_unknown_lists_serve_anything() -> None:
    pool = ReplicaPool(["http://a", "http://b", "http://c"])
    a, b, c = pool.active()
    assert pool.available_for("x") == (a, b, c) and pool.any_open()
    pool.set_models(a, [{"id": "x"}, {"id": "lora", "parent": "x"}])
    pool.set_models(b, [{"id": "y"}])
    assert pool.available_for("x") == (a,)  # a lists it: c, whose list is unknown, waits
    assert pool.available_for("w") == (c,)  # nobody lists w: c may serve it
    pool.set_models(c, [{"id": "y"}])
    assert not pool.any_open()
    assert pool.available_for("x") == (a,) and pool.available_for("lora") == (a,)
    assert pool.available_for("y") == (b, c) and pool.available_for("z") == ()
    assert pool.available_for(None) == (a, b, c)
    assert {m: [r.url for r in rs] for m, rs in pool.catalog().items()} == {
        "lora": ["http://a"], "x": ["http://a"], "y": ["http://b", "http://c"],
    }  # fmt: skip
    pool.set_healthy(b, False)
    assert pool.available_for("y") == (c,)
    pool.update(["http://a", "http://c"], models={"http://c": ["z"]})  # b leaves, c configured
    assert pool.available_for("z") == (c,) and "y" not in pool.catalog()
    pool.set_models(c, [{"id": "other"}])  # a configured list is never replaced by a poll
    assert pool.available_for("z") == (c,)
    pool.update(["http://a", "http://c"])  # its list left the config: polled again
    assert c.models is None and pool.available_for("z") == (c,)


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"name": "a", "target": "b"}, {"name": "a", "target": "c"}], "is also models[0]"),
        ([{"name": "a", "target": "b"}, {"name": "b", "target": "c"}], "is itself an alias"),
        ([{"name": "a"}], "give either a 'target'"),
        ([{"name": "a", "target": "b", "strategy": "random"}], "give either a 'target'"),
        ([{"name": "a", "target": "a"}], "cannot target itself"),
        ([{"name": "a", "strategy": "fastest"}], "models[0].strategy"),
    ],
)
def test_bad_models_sections_name_what_to_fix(models: list[dict[str, str]], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"replicas": [{"url": "http://a"}], "models": models})


def test_deep_json_and_a_bom_are_read_like_the_replica_would() -> None:
    deep = b'{"model": "x", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert asked("/v1/completions", deep) is None  # RecursionError: not a 500
    assert asked("/v1/completions", b'\xef\xbb\xbf{"model": "m"}') == "m"
    assert asked("/v2/models/org%2Fm/infer", b"") == "org/m"  # one segment, decoded
