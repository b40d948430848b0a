"""Generation bookkeeping shared by every batcher and engine, torch-free.

A `GenRequest` enters a batcher; engines turn it into token ids step by step; a
`SequenceTracker` turns ids into text, applies `stop` strings and `max_tokens`, and emits
`TokenEvent`s to the request's sink: a plain callable, possibly called on the forward-pass
thread (the completions route hands each event to the event loop, replica/routes/openai.py).
A request's `on_finish`, when it has one (a traced request), gets its `Completion` as its last
token is pushed, on the same thread.
"""

from __future__ import annotations

import codecs
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]
TokenSink = Callable[["TokenEvent"], None]
FinishHook = Callable[["Completion"], None]

_ids = itertools.count(1)


def next_sequence_id() -> int:
    return next(_ids)


def _drop(_event: TokenEvent) -> None:
    return None


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class GenRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    context_len: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    sink: TokenSink = _drop
    id: int = field(default_factory=next_sequence_id)
    on_finish: FinishHook | None = None

    @property
    def token_budget(self) -> int:
        return min(self.max_tokens, self.context_len - len(self.prompt_ids))


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # text that is now safe to show (may be "" while a stop string could be forming)
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: FinishReason
    first_token_at_s: float
    finished_at_s: float
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (OpenAI's cached_tokens)
    started_at_s: float = 0.0  # when a batch took it (it left the queue)
    batch_size: int = 1  # sequences in its batch (continuous: running when it joined)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for one-token completions."""
        if len(self.token_ids) < 2:
            return None
        return (self.finished_at_s - self.first_token_at_s) / (len(self.token_ids) - 1)


def split_at_stop(buffer: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """Split pending text into (emit now, hold back, stopped).

    Text before the earliest stop string is emitted and generation ends; otherwise the longest
    suffix that could still grow into a stop string is held back.
    """
    hits = [i for i in (buffer.find(s) for s in stops if s) if i >= 0]
    if hits:
        return buffer[: min(hits)], "", True
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(buffer)), hold, -1):
            if buffer.endswith(stop[:n]):
                hold = n
                break
    return buffer[: len(buffer) - hold], buffer[len(buffer) - hold :], False


class SequenceTracker:
    """Per-request decoding state: bytes -> text, stop strings, max_tokens, timestamps."""

    def __init__(self, request: GenRequest, now: Callable[[], float] = time.monotonic) -> None:
        self.request = request
        self._budget = request.token_budget
        self._now = now
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self._text: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.cached_tokens = 0  # prompt tokens the batcher found in the prefix cache
        self.batch_size = 1  # set by the batcher
        self._started_at = now()  # trackers are made as a batch takes their request
        self._first_at = 0.0
        self._last_at = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> TokenEvent:
        self._last_at = self._now()
        if not self.token_ids:
            self._first_at = self._last_at
        self.token_ids.append(token_id)
        chunk = self._decoder.decode(bytes([token_id]) if token_id < 256 else b"")
        if self.request.stop:
            emit, self._held, stopped = split_at_stop(self._held + chunk, self.request.stop)
        else:
            emit, stopped = chunk, False
        if stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self._budget:
            self.finish_reason = "length"
            emit += self._held + self._decoder.decode(b"", final=True)
            self._held = ""
        self._text.append(emit)
        event = TokenEvent(token_id, emit, self.finish_reason)
        self.request.sink(event)
        if self.finish_reason is not None and self.request.on_finish is not None:
            self.request.on_finish(self.completion())
        return event

    def completion(self) -> Completion:
        if self.finish_reason is None:
            raise RuntimeError("sequence has not finished")
        return Completion(
            text="".join(self._text),
            token_ids=tuple(self.token_ids),
            prompt_tokens=len(self.request.prompt_ids),
            finish_reason=self.finish_reason,
            first_token_at_s=self._first_at,
            finished_at_s=self._last_at,
            cached_tokens=self.cached_tokens,
            started_at_s=self._started_at,
            batch_size=self.batch_size,
        )
