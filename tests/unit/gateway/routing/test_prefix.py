"""Prefix-aware routing, pure: the gateway's block hashes are the replica's, the index is exact
and bounded, and the policy trades cache hits against load the same way at any fleet size."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routing.base import Policy
from gateway.routing.options import PolicyOptions, PrefixOptions
from gateway.routing.prefix import HASH_SCHEME, TOKENIZER, PrefixIndex, block_hashes, prompt_text
from gateway.routing.prefix_aware import PrecisePrefix, PrefixAware
from gateway.routing.replica import Replica
from gateway.routing.request import RequestInfo
from replica.kv import HASH_SCHEME as REPLICA_SCHEME
from replica.kv import chain_hashes
from replica.models.chat_template import apply_chat_template
from replica.models.tokenizer import encode

SYSTEM = "You are a careful assistant. " * 20  # 580 bytes: 36 blocks of 16


@given(st.text(max_size=300), st.sampled_from([1, 4, 16, 64]))
@settings(max_examples=300)
def test_the_gateway_hashes_a_prompt_as_the_replica_does(text: str, block: int) -> None:
    try:
        ids = encode(text)
    except UnicodeEncodeError:
        return  # the replica refuses such a prompt with a 400; routing it anywhere is fine
    assert block_hashes(text, block, 10_000) == tuple(chain_hashes(ids, block))
    assert block_hashes(text, block, 3 * block) == tuple(chain_hashes(ids[: 3 * block], block))


def test_the_scheme_strings_match_what_the_replica_publishes() -> None:
    from replica.routes.health import cache_blocks  # noqa: F401 - the route that publishes them

    assert HASH_SCHEME == REPLICA_SCHEME
    assert TOKENIZER == "bytes: BOS (256) then the UTF-8 bytes of the prompt"


def test_chat_messages_render_as_the_replicas_template() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"text": "there"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And?"},
    ]  # fmt: skip
    pairs = [
        ("system", "Be brief."),
        ("user", "Hi there"),
        ("assistant", "Hello."),
        ("user", "And?"),
    ]
    assert prompt_text({"messages": messages}) == apply_chat_template(pairs)  # type: ignore[arg-type]
    assert prompt_text({"prompt": ["first", "second"]}) == "first"
    assert prompt_text({"messages": [{"content": "no role"}]}) is None
    assert prompt_text({"input": "x"}) is None


def test_the_index_finds_the_longest_run_each_replica_holds() -> None:
    index = PrefixIndex(1000)
    chain = block_hashes(SYSTEM, 16, 4096)
    index.insert("a", chain)
    index.insert("b", chain[:10])
    other = block_hashes("x" * 200 + SYSTEM, 16, 4096)
    index.insert("c", other)
    assert index.matched_blocks(chain) == {"a": len(chain), "b": 10}
    assert index.matched_blocks(chain[:5]) == {"a": 5, "b": 5}
    assert index.matched_blocks(block_hashes("unrelated " * 20, 16, 4096)) == {}
    assert index.matched_blocks(()) == {}
    index.forget("a")
    assert index.matched_blocks(chain) == {"b": 10} and index.urls() == {"b", "c"}
    index.forget_all_but(["c"])
    assert index.urls() == {"c"} and len(index) == len(other)


def test_the_index_evicts_least_recently_used_and_never_holds_more_than_its_cap() -> None:
    index = PrefixIndex(10)
    old, new = block_hashes("o" * 200, 16, 4096)[:6], block_hashes("n" * 200, 16, 4096)[:6]
    index.insert("a", old)
    index.insert("a", old[:2])  # the first two blocks used again
    index.insert("b", new)
    assert len(index) == 10
    assert index.matched_blocks(new) == {"b": 6}
    assert index.matched_blocks(old) == {"a": 2}  # the tail went first, the reused head stayed


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 30), st.integers(0, 8))))
@settings(max_examples=200)
def test_index_state_stays_consistent_and_bounded(ops: list[tuple[str, int, int]]) -> None:
    index = PrefixIndex(25)
    chains = [block_hashes(f"{i:02d}" * 100, 16, 4096) for i in range(31)]
    for url, which, length in ops:
        index.insert(url, chains[which][:length])
        assert len(index) <= 25
    held = {(h, url) for url in index.urls() for h in index._by_url[url]}
    assert held == set(index._lru)
    assert {h: urls for h, urls in index._holders.items()} == {
        h: {u for hh, u in held if hh == h} for h, _ in held
    }


def dispatch(policy: Policy, fleet: Sequence[Replica], request: RequestInfo) -> Replica:
    """The policy's choice, dispatched: admission tells it where the request went."""
    replica = policy.choose(fleet, request)
    policy.on_dispatch(replica, request)
    return replica


def test_a_choice_that_is_not_dispatched_teaches_nothing() -> None:
    fleet = _fleet(4)
    policy = PrefixAware(random.Random(3), PolicyOptions())
    chosen = policy.choose(fleet, _request(SYSTEM + "q"))
    assert policy.matched(_request(SYSTEM + "r")) == {}  # a failed lease never taught it
    policy.on_dispatch(chosen, _request(SYSTEM + "q"))
    assert set(policy.matched(_request(SYSTEM + "r"))) == {chosen.url}


def _fleet(n: int) -> list[Replica]:
    return [Replica(f"http://127.0.0.1:{9000 + i}") for i in range(n)]


def _request(text: str, session: str | None = None) -> RequestInfo:
    length = len(text.encode()) + 1
    return RequestInfo(length, session, block_hashes(text, 16, 4096), length)


def test_a_prefix_goes_to_the_replica_that_has_it_while_load_is_even() -> None:
    fleet = _fleet(4)
    policy = PrefixAware(random.Random(0), PolicyOptions())
    first = dispatch(policy, fleet, _request(SYSTEM + "question 0"))
    picks = Counter(
        dispatch(policy, fleet, _request(SYSTEM + f"question {i}")).url for i in range(50)
    )
    assert picks == {first.url: 50}  # idle fleet: every one reuses the 36 cached blocks


@pytest.mark.parametrize("n", [2, 8, 200])
def test_a_hot_prefix_moves_when_its_replica_is_loaded_relative_to_the_fleet(n: int) -> None:
    fleet = _fleet(n)
    policy = PrefixAware(random.Random(1), PolicyOptions())
    home = dispatch(policy, fleet, _request(SYSTEM + "warm"))
    for replica in fleet:
        replica.outstanding = 2
    home.outstanding = 3  # 3 <= ceil(1.5 x mean): the cache still wins
    assert dispatch(policy, fleet, _request(SYSTEM + "a")) is home
    home.outstanding = 6  # past 1.5 x the mean for n >= 8; at n = 2 the cost says so
    moved = dispatch(policy, fleet, _request(SYSTEM + "b"))
    assert moved is not home and moved.outstanding == 2


def test_the_concurrency_threshold_makes_load_win() -> None:
    fleet = _fleet(3)
    options = PolicyOptions(prefix=PrefixOptions(concurrency_threshold=2))
    policy = PrefixAware(random.Random(2), options)
    home = dispatch(policy, fleet, _request(SYSTEM))
    home.outstanding = 2
    assert dispatch(policy, fleet, _request(SYSTEM + "x")) is not home


@pytest.mark.parametrize("n", [2, 5, 50])
def test_unique_prompts_spread_like_least_outstanding(n: int) -> None:
    fleet = _fleet(n)
    policy = PrefixAware(random.Random(3), PolicyOptions())
    rng = random.Random(4)
    for i in range(40 * n):
        text = f"{rng.random():.12f} unique prompt {i} " * 8
        replica = dispatch(policy, fleet, _request(text))
        replica.outstanding += 1
    counts = [r.outstanding for r in fleet]
    assert max(counts) - min(counts) <= 1, counts


def test_shared_system_prompts_still_balance_a_loaded_small_fleet() -> None:
    # SGLang's absolute threshold (64 requests) sends all of this to one replica; ours may not.
    fleet = _fleet(2)
    policy = PrefixAware(random.Random(5), PolicyOptions())
    for i in range(60):
        replica = dispatch(policy, fleet, _request(SYSTEM + f"turn {i}"))
        replica.outstanding += 1
    counts = sorted(r.outstanding for r in fleet)
    assert counts[1] <= 1.5 * (sum(counts) + 1) / 2 + 1, counts


def test_a_session_without_a_readable_prompt_follows_its_last_replica() -> None:
    fleet = _fleet(5)
    policy = PrefixAware(random.Random(6), PolicyOptions())
    home = dispatch(policy, fleet, _request(SYSTEM, session="s1"))
    unreadable = RequestInfo(1, "s1", (), 0)
    assert all(dispatch(policy, fleet, unreadable) is home for _ in range(20))


def test_replicas_that_leave_are_forgotten() -> None:
    fleet = _fleet(3)
    policy = PrefixAware(random.Random(7), PolicyOptions())
    home = dispatch(policy, fleet, _request(SYSTEM, session="s"))
    policy.replicas_changed([r.url for r in fleet if r is not home])
    assert home.url not in policy.index.urls()
    assert policy.matched(RequestInfo(1, "s", (), 0)) == {}


def test_precise_prefix_routes_by_what_the_replicas_report() -> None:
    fleet = _fleet(4)
    policy = PrecisePrefix(random.Random(8), PolicyOptions())
    request = _request(SYSTEM + "q")
    holder = fleet[2]
    policy.on_cache(holder.url, dict.fromkeys(request.prefix[:20], 1.0), replace=True)
    assert all(dispatch(policy, fleet, request) is holder for _ in range(10))
    assert policy.index.matched_blocks(request.prefix) == {holder.url: 20}  # routing adds none
    policy.on_cache(holder.url, {}, replace=True)  # it restarted: its cache is empty
    assert policy.matched(request) == {}


def test_precise_prefix_choices_do_not_depend_on_the_gateway() -> None:
    # Two gateways (their own random sources) with the same reports and loads agree, and a
    # prefix nobody holds yet keeps to one replica (rendezvous hashing on its first block).
    fleet = _fleet(5)
    one, two = (PrecisePrefix(random.Random(seed), PolicyOptions()) for seed in (1, 2))
    for policy in (one, two):
        policy.on_cache(fleet[0].url, dict.fromkeys(_request(SYSTEM).prefix, 1.0), replace=True)
    fleet[3].outstanding = 1
    prompts = [SYSTEM + "a", "unrelated prompt " * 10, "another one " * 30, f"{SYSTEM[:40]} b"]
    for text in prompts:
        assert dispatch(one, fleet, _request(text)) is dispatch(two, fleet, _request(text))
    fresh = "a prefix no replica holds " * 8
    assert len({dispatch(one, fleet, _request(fresh + str(i))).url for i in range(10)}) == 1


def test_with_known_capacity_a_prefix_stays_home_while_it_has_a_free_slot() -> None:
    fleet = _fleet(4)
    for replica in fleet:
        replica.max_concurrency = 8  # as if each reported capacity=8
    policy = PrefixAware(random.Random(9), PolicyOptions())
    home = dispatch(policy, fleet, _request(SYSTEM + "warm"))
    home.outstanding = 6  # far above the idle fleet's mean, but two slots are free
    assert dispatch(policy, fleet, _request(SYSTEM + "a")) is home
    home.outstanding = 8  # full: the request would wait, so it goes where a slot is free
    moved = dispatch(policy, fleet, _request(SYSTEM + "b"))
    assert moved is not home and moved.outstanding == 0


def test_a_reported_capacity_counts_only_while_the_report_is_fresh() -> None:
    now = [100.0]
    options = PolicyOptions(feedback_max_age_s=2.0, clock=lambda: now[0])
    policy = PrefixAware(random.Random(10), options)
    replica = _fleet(1)[0]
    replica.reported, replica.reported_at = {"capacity": 16, "inflight": 0}, 99.0
    assert policy.capacity(replica, now[0]) == 16
    now[0] = 102.5
    assert policy.capacity(replica, now[0]) is None


def test_scores_explain_the_choice_cached_tokens_lower_a_replicas_cost() -> None:
    fleet = _fleet(3)
    policy = PrefixAware(random.Random(4), PolicyOptions())
    home = dispatch(policy, fleet, _request(SYSTEM + "warm"))
    request = _request(SYSTEM + "next")
    scores = policy.scores(fleet, request)
    assert scores is not None and set(scores) == {r.url for r in fleet}
    assert min(scores, key=lambda url: scores[url]) == home.url == policy.choose(fleet, request).url
    assert scores[home.url] < 0  # its cached tokens outweigh an idle replica's zero load
