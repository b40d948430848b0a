"""Which replicas a deferred job may go to, and what a replica's answer means for the job;
plus the `jobs:` config section's errors. Pure logic on real pool and admission objects."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.jobs.model import Job
from gateway.jobs.scheduler import Reply, eligible, outcome_of
from gateway.pool.live import Live, build_runtime
from gateway.pool.replicas import ReplicaPool

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"]


def _state(**extra: Any) -> Live:
    config = parse_config({"replicas": [{"url": u} for u in URLS], **extra})
    pool = ReplicaPool(config.replica_urls)
    state = Live.start(build_runtime(config), pool)
    state.models_polled = True  # the replicas' model lists are in (gateway/datapath/models.py)
    return state


def _settings(state: Live) -> Any:
    assert state.runtime.config.jobs is not None
    return state.runtime.config.jobs


def test_only_replicas_below_the_threshold_are_eligible() -> None:
    state = _state(jobs={"store": "x.db", "max_outstanding_per_replica": 2})
    a, b, c = state.pool.all()
    for replica, n in ((a, 2), (b, 1)):
        for _ in range(n):
            state.pool.acquire(replica)
    assert list(eligible(state, _settings(state))) == [b, c]
    state.pool.report(c, {"inflight": 5}, ours=0)  # other gateways keep c busy
    assert list(eligible(state, _settings(state))) == [b]
    state.pool.report(c, {"inflight": 0}, ours=0)
    state.pool.set_healthy(c, False)
    assert list(eligible(state, _settings(state))) == [b]
    state.models_polled = False  # before the first round of /v1/models: nowhere yet
    assert list(eligible(state, _settings(state))) == []
    state.models_polled = True
    state.draining = True
    assert list(eligible(state, _settings(state))) == []


def test_real_time_limits_cap_the_job_threshold() -> None:
    limits = {"max_outstanding_per_replica": 1, "max_outstanding": 2}
    state = _state(jobs={"store": "x.db", "max_outstanding_per_replica": 4}, limits=limits)
    a, b, c = state.pool.all()
    state.pool.acquire(a)
    assert list(eligible(state, _settings(state))) == [b, c]
    state.pool.acquire(b)  # the gateway-wide limit is reached
    assert list(eligible(state, _settings(state))) == []


def _job(attempt: int) -> Job:
    return Job(
        seq=1, id="job_1", batch_id=None, line=None, custom_id=None, method="POST", url="/x",
        body="{}", status="running", attempt=attempt, created_at=0.0, started_at=0.0,
        finished_at=None, expires_at=None, status_code=None, response=None, error_code=None,
        error_message=None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "attempt", "expected"),
    [
        (Reply(200, "{}"), 1, ("succeeded", 200, None)),
        (Reply(400, "bad"), 1, ("failed", 400, None)),
        (Reply(500, "boom"), 1, ("failed", 500, None)),  # not retried: the replica answered
        (Reply(503, "busy"), 1, None),  # queued again
        (Reply(None, "refused"), 2, None),
        (Reply(429, "busy"), 3, ("failed", 429, None)),
        (Reply(None, "refused"), 3, ("failed", None, "upstream_error")),
    ],
)
def test_what_a_reply_means_for_the_job(
    reply: Reply, attempt: int, expected: tuple[str, int | None, str | None] | None
) -> None:
    outcome = outcome_of(reply, _job(attempt), max_attempts=3)
    got = None if outcome is None else (outcome.status, outcome.status_code, outcome.error_code)
    assert got == expected


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        ({}, "jobs.store: required key is missing"),
        ({"store": ""}, "jobs.store: expected a file path"),
        ({"store": "x.db", "max_outstanding_per_replica": 0}, "jobs.max_outstanding_per_replica"),
        ({"store": "x.db", "max_batch_lines": "many"}, "jobs.max_batch_lines: "),
        ({"store": "x.db", "retention": 5}, "jobs.retention: unknown key"),
    ],
)
def test_jobs_config_errors_name_the_key(jobs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"replicas": [{"url": URLS[0]}], "jobs": jobs})
    assert expected in str(info.value)


def test_jobs_are_off_by_default() -> None:
    assert parse_config({"replicas": [{"url": URLS[0]}]}).jobs is None
