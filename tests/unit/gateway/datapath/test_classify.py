"""Classification: the model a request asks for and the work estimate, affinity key and prefix
hashes its policy needs, from one parse of the body."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import parse_config
from gateway.datapath import classify as classify_module
from gateway.datapath.classify import classify, describe
from gateway.datapath.sse import SseCounter
from gateway.pool.live import Live, build_runtime
from gateway.pool.replicas import ReplicaPool
from gateway.routing.options import AffinityOptions
from gateway.routing.request import NO_INFO

AFFINITY = AffinityOptions(header="X-Session-Id", prompt_prefix_chars=8)


def _headers(**items: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in items.items()}))


def _body(payload: object) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("payload", "tokens"),
    [
        ({"prompt": "x" * 40, "max_tokens": 100}, 10 + 100),
        ({"prompt": "x" * 41}, 11 + 16),  # OpenAI's default max_tokens
        ({"prompt": [1, 2, 3], "max_tokens": 5}, 3 + 5),  # token ids count exactly
        ({"messages": [{"role": "user", "content": "y" * 8}], "max_tokens": 7}, 2 + 7),
        ({"prompt": "abcd", "max_tokens": -3}, 1 + 16),  # nonsense: the replica will refuse it
        ({"inputs": [{"name": "x", "data": [1.0]}]}, 1),  # not a completion
        ([1, 2], 1),
    ],
)
def test_tokens_are_prompt_plus_max_tokens(payload: object, tokens: int) -> None:
    info = describe({"tokens"}, _headers(), _body(payload), AFFINITY)
    assert info.tokens == tokens


@pytest.mark.parametrize("body", [b"", b"not json", b"{broken", b"\xff\xfe"])
def test_a_body_that_is_not_json_counts_as_one(body: bytes) -> None:
    assert describe({"tokens"}, _headers(), body, AFFINITY).tokens == 1


def test_the_affinity_header_wins_over_the_prompt_prefix() -> None:
    body = _body({"prompt": "You are a helpful assistant. Hi"})
    assert describe({"key"}, _headers(X_Session_Id="abc"), body, AFFINITY).key == "abc"
    assert describe({"key"}, _headers(), body, AFFINITY).key == "You are "
    off = AffinityOptions(header=None, prompt_prefix_chars=0)
    assert describe({"key"}, _headers(X_Session_Id="abc"), body, off).key is None


def test_nothing_is_parsed_for_a_policy_that_needs_nothing() -> None:
    info = describe(set(), _headers(), _body({"prompt": "x", "max_tokens": 9}), AFFINITY)
    assert (info.tokens, info.key) == (0, None)


def _feed(chunks: list[bytes]) -> tuple[int, bool]:
    events = SseCounter()
    count = sum(events.feed(chunk) for chunk in chunks)
    return count, events.failed


def test_sse_data_lines_are_counted_at_line_starts_only() -> None:
    chunk = b'data: {"a": 1}\n\ndata: {"a": 2}\n\ndata: [DONE]\n\n'
    assert _feed([chunk]) == (3, False)
    assert _feed([b": keep-alive\n\n"]) == (0, False)
    assert _feed([b'data: {"text": "data: data: data:"}\n\n']) == (1, False)


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_sse_events_split_anywhere_are_read_whole(end: bytes) -> None:
    stream = b"event: error" + end + b'data: {"x": 1}' + end + end
    for cut in range(1, len(stream)):
        assert _feed([stream[:cut], stream[cut:]]) == (1, True), cut
    ok = b'data: {"x": 1}' + end + end + b"data: [DONE]" + end + end
    for cut in range(1, len(ok)):
        assert _feed([ok[:cut], ok[cut:]]) == (2, False), cut


@pytest.mark.parametrize(
    "event",
    [
        b"event: error\ndata: {}\n\n",
        b"event:error\ndata: x\n\n",
        b'data: {"error": {"message": "engine died"}}\n\n',
        b'data: {"object": "error", "message": "old vLLM"}\n\n',
        b'data: {"error":\ndata: "split over two data lines"}\n\n',
    ],
)
def test_sse_error_events_fail_the_stream(event: bytes) -> None:
    assert _feed([b"data: {}\n\n", event])[1]


@pytest.mark.parametrize(
    "text",
    [
        "event: error",
        '\nevent: error\ndata: {"error": 1}\n\n',
        'data: {"error": "x"}',
        '{"object": "error"}',
    ],
)
def test_sse_text_a_model_writes_never_fails_the_stream(text: str) -> None:
    chunk = json.dumps({"choices": [{"text": text}], "error": None}).encode()
    assert _feed([b"data: " + chunk + b"\n\n"]) == (1, False)


def test_sse_an_unended_line_is_held_only_to_a_bound() -> None:
    events = SseCounter()
    for _ in range(100):
        assert events.feed(b"x" * 64 * 1024) == 0
    assert len(events._partial) <= 64 * 1024
    assert events.feed(b"\n\nevent: error\n\n") == 0 and events.failed


def _live(strategy: str) -> Live:
    config = parse_config(
        {
            "routing": {"strategy": strategy},
            "replicas": [{"url": "http://127.0.0.1:9001", "models": ["tiny"]}],
            "models": [{"name": "chat", "target": "tiny"}],
        }
    )
    live = Live.start(build_runtime(config), ReplicaPool(config.replica_urls))
    live.swap(live.runtime)
    return live


CHAT = {"model": "chat", "messages": [{"role": "user", "content": "z" * 200}], "max_tokens": 9}


@pytest.mark.parametrize("lead", [b"", b"\xef\xbb\xbf", b"\xef\xbb\xbf \n"])
def test_a_bom_prefixed_chat_body_is_routed_by_model_and_counted_and_hashed(
    lead: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    parses: list[bytes] = []
    loads = json.loads
    monkeypatch.setattr(classify_module.json, "loads", lambda s: parses.append(s) or loads(s))
    body = lead + _body(CHAT)
    prefix = classify(_live("prefix_aware"), "/v1/chat/completions", _headers(), body)
    assert (prefix.model, prefix.asked) == ("tiny", "chat")  # the alias, resolved
    assert loads(prefix.body)["model"] == "tiny"  # and rewritten for the replica
    assert prefix.info.model == "tiny"
    assert prefix.info.prompt_tokens > 200 and prefix.info.prefix  # the prompt's block hashes
    tokens = classify(_live("least_outstanding_tokens"), "/v1/chat/completions", _headers(), body)
    assert tokens.info.tokens == 200 // 4 + 9 and tokens.info.model == "tiny"
    assert len(parses) == 2  # one parse per request, for the model and the policy alike


def test_a_body_is_not_parsed_when_nothing_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"replicas": [{"url": "http://127.0.0.1:9001"}]})
    live = Live.start(build_runtime(config), ReplicaPool(config.replica_urls))
    monkeypatch.setattr(classify_module, "parse_body", lambda body: pytest.fail("parsed"))
    sent = classify(live, "/v1/completions?x=1", _headers(), _body({"model": "m"}))
    assert (sent.model, sent.path_qs, sent.info) == (None, "/v1/completions?x=1", NO_INFO)
