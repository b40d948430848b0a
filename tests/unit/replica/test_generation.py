"""Text bookkeeping: stop strings held back until decided, byte-level decoding, limits."""

from __future__ import annotations

from replica.generation import GenRequest, SequenceTracker, split_at_stop
from replica.models.tokenizer import BOS, decode, encode


def test_split_emits_text_before_a_stop_and_stops() -> None:
    assert split_at_stop("hello world", ("o w",)) == ("hell", "", True)


def test_split_holds_back_a_possible_stop_prefix() -> None:
    assert split_at_stop("hello wo", ("world",)) == ("hello ", "wo", False)
    assert split_at_stop("abc", ()) == ("abc", "", False)


def test_tracker_finishes_at_max_tokens_and_flushes_held_text() -> None:
    tracker = SequenceTracker(GenRequest((BOS,), 3, 64, stop=("xyz",)))
    events = [tracker.push(t) for t in b"axy"]
    assert [e.text for e in events] == ["a", "", "xy"]
    assert tracker.completion().finish_reason == "length"
    assert tracker.completion().text == "axy"


def test_tracker_decodes_multibyte_utf8_across_tokens() -> None:
    tracker = SequenceTracker(GenRequest((BOS,), 10, 64))
    texts = [tracker.push(t).text for t in "é!".encode()]
    assert "".join(texts) == "é!"


def test_context_length_bounds_the_budget() -> None:
    assert GenRequest(tuple(range(60)), 100, 64).token_budget == 4


def test_tokenizer_round_trips_any_text() -> None:
    text = "héllo, мир 🌍"
    ids = encode(text)
    assert ids[0] == BOS
    assert decode(ids) == text
