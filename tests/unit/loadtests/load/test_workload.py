"""The load generators' default workload fits the model `infergate up` serves (Locust or the
open-loop generator run by hand against `make run` get no 400s), and fitting a workload to a
model changes only the requests that did not fit."""

from __future__ import annotations

import pytest

from loadtests.load.workload import DEFAULT_MODEL_LIMITS, ModelLimits, Workload, draw, user_rng
from replica.config import TinyGptModelConfig, TinyGptParams
from replica.models.tokenizer import encode


def _fits(workload: Workload, limits: ModelLimits, users: int = 40, each: int = 250) -> int:
    """How many of users x each draws the model would refuse (as replica/routes/openai.py)."""
    refused = 0
    for user in range(users):
        rng = user_rng(workload, user)
        for _ in range(each):
            request = draw(workload, rng)
            too_long = len(encode(request.prompt)) + request.max_tokens > limits.context_len
            refused += request.max_tokens > limits.max_tokens or too_long
    return refused


def test_the_default_limits_are_the_default_replicas() -> None:
    model = TinyGptModelConfig(kind="tiny-gpt")
    assert ModelLimits(model.max_tokens_limit, TinyGptParams().context_len) == DEFAULT_MODEL_LIMITS


def test_without_a_bench_workload_every_request_fits_the_default_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("INFERGATE_BENCH_WORKLOAD", raising=False)
    assert _fits(Workload.from_env(), DEFAULT_MODEL_LIMITS) == 0
    assert _fits(Workload(), DEFAULT_MODEL_LIMITS) > 0  # the bench's own workload would not


def test_a_fitted_workload_keeps_every_request_that_fitted() -> None:
    limits = ModelLimits(max_tokens=128, context_len=300)
    wide, fitted = Workload(seed=4), Workload(seed=4).for_model(limits)
    same = changed = 0
    for user in range(20):
        a, b = user_rng(wide, user), user_rng(fitted, user)
        for _ in range(100):
            before, after = draw(wide, a), draw(fitted, b)
            if before.max_tokens <= 128 and len(encode(before.prompt)) + before.max_tokens <= 300:
                assert after == before
                same += 1
            else:
                assert after.prompt.split() == before.prompt.split()[: len(after.prompt.split())]
                changed += 1
            assert len(encode(after.prompt)) + after.max_tokens <= 300
    assert same > 0 and changed > 0


def test_the_bench_workload_is_sent_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    workload = Workload(seed=7, output_max=512)
    monkeypatch.setenv("INFERGATE_BENCH_WORKLOAD", workload.to_env())
    assert Workload.from_env() == workload
