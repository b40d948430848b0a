"""The discrete-event model of the routing benchmark: exact step timing and queueing rules,
and the gateway's own policies run over it (a policy registered later is simulated too)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

import pytest

from gateway.routing.base import Policy
from gateway.routing.options import PolicyOptions
from gateway.routing.policies import POLICIES
from gateway.routing.replica import Replica
from gateway.routing.request import Need, RequestInfo
from loadtests.load.workload import Workload
from loadtests.sim.gateway import CENTRAL_QUEUE, front_ends
from loadtests.sim.model import (
    Profile,
    Request,
    Simulation,
    capacity_rps,
    closed_loop,
    open_loop,
)

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
        peak = max(peak, *(r.inflight for r in sim.replicas))

    sim.on_done = watch
    for i in range(20):
        sim.submit(_request(5 + i, user=i))
        peak = max(peak, *(r.inflight for r in sim.replicas))
    sim.run_until(600)
    assert peak == 2 and len(sim.done) == 20


def test_least_outstanding_matches_the_central_queue_when_users_fill_every_slot() -> None:
    workload = Workload(output_sigma=0.5)
    args = {"warmup_s": 20.0, "duration_s": 200.0}
    lor = closed_loop("least_outstanding_requests", 20, 5, workload, **args)
    central = closed_loop(CENTRAL_QUEUE, 20, 5, workload, **args)
    rand = closed_loop("random", 20, 5, workload, **args)
    assert lor.p99_s == pytest.approx(central.p99_s, rel=0.05)
    assert rand.p99_s > 1.1 * central.p99_s  # 1.14-1.34 over seeds 0-5
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
    return max(r.inflight for r in sim.replicas)


def test_two_blind_gateways_collide_where_load_feedback_does_not() -> None:
    blind = [
        _max_per_replica_after_four_requests("least_outstanding_requests", s) for s in range(30)
    ]
    informed = [_max_per_replica_after_four_requests("least_loaded", s) for s in range(30)]
    assert max(informed) == 1
    assert sum(m > 1 for m in blind) > 10  # 5 times in 6 in expectation


def test_counts_go_back_to_zero_in_every_gateway_pool() -> None:
    sim = Simulation("least_outstanding_tokens", 3, Workload(), gateways=2)
    for i in range(12):
        request = _request(5 + i, user=i)
        request.gateway = i % 2
        sim.submit(request)
    sim.run_until(600)
    assert len(sim.done) == 12
    for gateway in sim.gateways:
        assert gateway.pool.outstanding == 0
        assert all((r.outstanding, r.outstanding_tokens) == (0, 0) for r in gateway.pool.all())
    assert all(r.inflight == 0 and not r.queue and not r.running for r in sim.replicas)


class _LastByUrl(Policy):
    """A policy the simulator has never heard of: it reads what policies read (the pool's
    Replica objects, the request's work estimate) and records what it was asked."""

    needs: ClassVar[frozenset[Need]] = frozenset({"tokens"})
    seen: ClassVar[list[tuple[int, int]]] = []

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._clock = options.clock

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        self.seen.append((request.tokens, sum(r.outstanding for r in replicas)))
        return max(replicas, key=lambda r: r.url)


def test_a_policy_registered_later_is_simulated_by_the_gateways_own_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(POLICIES, "last_by_url", _LastByUrl)
    monkeypatch.setattr(_LastByUrl, "seen", [])
    assert "last_by_url" in front_ends()
    sim = Simulation("last_by_url", 3, Workload())
    prompt = "x" * 40
    for i in range(3):
        request = _request(7, prompt=len(prompt), user=i)
        request.body = f'{{"prompt": "{prompt}", "max_tokens": 7}}'.encode()
        sim.submit(request)
    sim.run_until(600)
    assert {r.replica for r in sim.done} == {2}  # the last URL, every time
    # gateway/datapath/classify.py's estimate (40 chars / 4 + max_tokens), and the pool's live
    # counts.
    assert _LastByUrl.seen == [(17, 0), (17, 1), (17, 2)]
    result = closed_loop("last_by_url", 6, 3, Workload(), warmup_s=5.0, duration_s=30.0)
    assert result.latencies_s


def test_peak_ewma_learns_the_slow_replica_from_the_pools_latency_samples() -> None:
    workload = Workload(output_sigma=0.5)
    ewma, blind = (
        closed_loop(policy, 20, 5, workload, warmup_s=20.0, duration_s=200.0, slowdowns=(3.0,))
        for policy in ("peak_ewma", "round_robin")
    )
    assert ewma.p99_s < 0.7 * blind.p99_s


# Mean P99 (s) and requests/min/instance over seeds 0-3 (20 users / 5 instances, sigma 0.5,
# 300 s after 20 s), from the simulator as it was before it ran the gateway's own policies.
BEFORE = {
    (1.0, "random"): (8.40, 75.2),
    (1.0, "round_robin"): (7.22, 86.3),
    (1.0, "least_outstanding_requests"): (6.76, 95.8),
    (1.0, "power_of_two"): (7.03, 88.6),
    (1.0, "least_loaded"): (6.76, 95.8),
    (1.0, "least_outstanding_tokens"): (6.75, 90.5),
    (1.0, CENTRAL_QUEUE): (6.76, 95.8),
    (2.0, "least_outstanding_requests"): (8.87, 86.1),
    (2.0, "power_of_two"): (9.64, 78.5),
    (2.0, "least_outstanding_tokens"): (8.98, 81.4),
}


@pytest.mark.parametrize(("slow", "policy"), list(BEFORE))
def test_existing_policies_simulate_as_before(slow: float, policy: str) -> None:
    runs = [
        closed_loop(
            policy, 20, 5, Workload(seed=seed, output_sigma=0.5),
            warmup_s=20.0, duration_s=300.0, slowdowns=(slow,),
        )
        for seed in range(4)
    ]  # fmt: skip
    p99 = sum(r.p99_s for r in runs) / len(runs)
    throughput = sum(r.per_instance_per_min for r in runs) / len(runs)
    before_p99, before_throughput = BEFORE[(slow, policy)]
    # Seed-to-seed spread of P99 is ~0.3 s; counting requests by end time (as live) instead
    # of by send time adds ~1% to throughput.
    assert p99 == pytest.approx(before_p99, rel=0.08)
    assert throughput == pytest.approx(before_throughput, rel=0.03)


def test_measured_by_end_time_like_the_live_report() -> None:
    result = closed_loop("random", 4, 1, Workload(), warmup_s=10.0, duration_s=60.0)
    assert all(10.0 <= t < 70.0 for t in result.end_times_s)
    pairs = zip(result.end_times_s, result.latencies_s, strict=True)
    sent = [end - latency for end, latency in pairs]
    assert min(sent) < 10.0  # the first ones measured were sent during the warm-up


def test_capacity_is_the_saturated_rate_of_the_modelled_replicas() -> None:
    workload = Workload(output_sigma=0.5)
    one = capacity_rps(1, workload, duration_s=300.0)
    five = capacity_rps(5, workload, duration_s=300.0)
    assert five == pytest.approx(5 * one, rel=0.05)
    half = capacity_rps(5, workload, slowdowns=(2.0,), duration_s=300.0)
    assert half == pytest.approx(4.5 * one, rel=0.05)
