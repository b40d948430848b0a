"""The discrete-event model of the routing benchmark: exact step timing and queueing rules."""

from __future__ import annotations

import pytest

from loadtests.simulate import (
    CENTRAL_QUEUE,
    Profile,
    Request,
    Simulation,
    closed_loop,
    open_loop,
)
from loadtests.workload import Workload

PROFILE = Profile()


def _request(tokens: int, prompt: int = 100, user: int = 0) -> Request:
    return Request(user, prompt, tokens, stream=False, sent_s=0.0)


def test_one_request_takes_a_prefill_step_then_one_decode_step_per_token() -> None:
    sim = Simulation("random", 1, Workload())
    request = _request(10)
    sim.submit(request)
    sim.run_until(60)
    first = PROFILE.step_s(100, 1, 0)
    assert request.first_token_s == pytest.approx(first)
    assert request.answered_s == pytest.approx(first + 9 * PROFILE.step_s(0, 0, 1))


def test_a_replica_runs_at_most_max_num_seqs_and_queues_the_rest() -> None:
    sim = Simulation("random", 1, Workload(), max_num_seqs=2)
    requests = [_request(5, user=i) for i in range(3)]
    for request in requests:
        sim.submit(request)
    sim.run_until(60)
    # The third starts only when the first two have finished (5 steps later).
    assert requests[2].first_token_s > requests[0].answered_s


def test_a_slow_replica_takes_proportionally_longer() -> None:
    sim = Simulation("round_robin", 2, Workload(), slowdowns=(2.0,))
    fast_first, slow_first = sorted([_request(20), _request(20, user=1)], key=lambda r: r.user)
    sim.submit(fast_first)
    sim.submit(slow_first)
    sim.run_until(60)
    latencies = sorted(r.answered_s - r.sent_s for r in (fast_first, slow_first))
    assert latencies[1] == pytest.approx(2 * latencies[0])


def test_central_queue_never_overfills_a_replica() -> None:
    sim = Simulation(CENTRAL_QUEUE, 3, Workload(), max_num_seqs=2)
    peak = 0

    def watch(request: Request) -> None:
        nonlocal peak
        peak = max(peak, *(r.outstanding for r in sim.replicas))

    sim.on_done = watch
    for i in range(20):
        sim.submit(_request(5 + i, user=i))
        peak = max(peak, *(r.outstanding for r in sim.replicas))
    sim.run_until(600)
    assert peak == 2 and len(sim.done) == 20


def test_least_outstanding_matches_the_central_queue_when_users_fill_every_slot() -> None:
    workload = Workload(output_sigma=0.5)
    args = {"warmup_s": 20.0, "duration_s": 200.0}
    lor = closed_loop("least_outstanding_requests", 20, 5, workload, **args)
    central = closed_loop(CENTRAL_QUEUE, 20, 5, workload, **args)
    rand = closed_loop("random", 20, 5, workload, **args)
    assert lor.p99_s == pytest.approx(central.p99_s, rel=0.05)
    assert rand.p99_s > 1.2 * central.p99_s
    assert rand.per_instance_per_min < lor.per_instance_per_min


def test_open_loop_random_queues_more_than_the_central_queue() -> None:
    workload = Workload(output_sigma=0.5)
    args = {"warmup_s": 20.0, "duration_s": 300.0}
    rand = open_loop("random", 5.0, 5, workload, **args)
    central = open_loop(CENTRAL_QUEUE, 5.0, 5, workload, **args)
    assert rand.p99_s > central.p99_s


def _max_per_replica_after_four_requests(policy: str, seed: int) -> int:
    sim = Simulation(policy, 4, Workload(), gateways=2, seed=seed)
    for i in range(4):
        request = _request(100, user=i)
        request.gateway = i % 2
        sim.submit(request)
    return max(r.outstanding for r in sim.replicas)


def test_two_blind_gateways_collide_where_load_feedback_does_not() -> None:
    blind = [
        _max_per_replica_after_four_requests("least_outstanding_requests", s) for s in range(30)
    ]
    informed = [_max_per_replica_after_four_requests("least_loaded", s) for s in range(30)]
    assert max(informed) == 1
    assert sum(m > 1 for m in blind) > 10  # 5 times in 6 in expectation
