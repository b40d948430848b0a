"""The live benchmark beside the model (loadtests/sim/model.py), as two sections of table.md:

- each scenario's offered load and capacity: the rate the saturation run measured on the live
  replicas, and the modelled replicas' saturated rate over the same window and requests;
- each scenario's best live P99 against the simulated central queue (the queueing bound for this
  workload on these replicas) over the same seeds as the live runs, with a 95% block-bootstrap
  interval, and against HAProxy leastconn when it ran.

The model is run over the same requests as the live window: the same warm-up and window length,
the same seeds, so every user draws the same requests in the same order
(loadtests/load/workload.py), and requests are selected the same way: those that ended in the
window. A longer simulation would measure another population: with heavy-tailed outputs, a long
window holds the long answers a short live window never sees end, and a start-up transient
weighs differently. An open-loop bound is simulated at the same share of the model's saturated
rate as the live runs are offered of the measured one (the same "85%" on both sides; when the
two capacities differ, the load section shows by how much), so a model that is a little slower
than the live replicas is never pushed past its own capacity.

A comparison needs a P99 on both sides: a scenario where the bound or a live strategy has fewer
requests than `stats.MIN_TAIL_SAMPLES` says so instead of naming a best strategy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from loadtests.analysis import stats
from loadtests.analysis.report import UNMEASURED, Load, Scenario, Summary
from loadtests.harness.plan import HAPROXY, Plan
from loadtests.load.scenarios import SATURATION_USERS_PER_SLOT
from loadtests.sim import model
from loadtests.sim.gateway import CENTRAL_QUEUE


@dataclass(frozen=True)
class Bound:
    """The simulated central queue's P99 over the plan's seeds, pooled (with an interval), each
    seed's own P99, and how many requests they pooled."""

    interval: stats.Interval
    per_seed: list[float]
    samples: int


def modelled_capacity(plan: Plan) -> dict[Scenario, float]:
    """Each scenario's saturated rate on the model (requests/s, all instances together), over
    the saturation run's own window and requests."""
    workload = replace(plan.workload, seed=plan.seeds[0])
    return {
        (users, instances): model.capacity_rps(
            instances,
            workload,
            slowdowns=(plan.slow,),
            warmup_s=plan.warmup_s,
            duration_s=plan.duration_s,
        )
        for users, instances in plan.scenarios
    }


def load_section(
    plan: Plan, loads: Mapping[Scenario, Load], modelled: Mapping[Scenario, float]
) -> str:
    lines = [
        "### Offered load and measured capacity",
        "",
        "Measured capacity: requests/s completed with every slot always full, on these "
        f"replicas in this run (a saturation run: {SATURATION_USERS_PER_SLOT} closed-loop users "
        f"per slot through least_outstanding_requests, seed {plan.seeds[0]}, "
        f"{plan.duration_s:g} s after {plan.warmup_s:g} s warm-up). Simulated capacity: the "
        "same on the model, over the same window and requests. Offered: requests sent per "
        "second in the window (per strategy in the detail table).",
        "",
        "| Users | Instances | Arrivals | Target rate (req/s) | Measured capacity (req/s) "
        "| Target / capacity | Simulated capacity (req/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for users, instances in plan.scenarios:
        load = loads.get((users, instances), UNMEASURED)
        arrivals = "Poisson" if plan.utilization else f"closed loop, {users} users"
        target = load.target_rps
        lines.append(
            f"| {users} | {instances} | {arrivals} | {_num(target, '{:.2f}')} | "
            f"{_num(load.capacity_rps, '{:.2f}', 'not measured')} | "
            f"{_num(target / load.capacity_rps if target else None, '{:.0%}')} | "
            f"{modelled[(users, instances)]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def against_bound(
    plan: Plan, summaries: Sequence[Summary], modelled: Mapping[Scenario, float]
) -> str:
    lines = [
        "### Against the ideal and HAProxy",
        "",
        "Simulated central queue: `loadtests/sim/model.py`, the same workload and replica model, "
        f"over the live runs' requests: the same {plan.duration_s:g} s window after "
        f"{plan.warmup_s:g} s warm-up, per seed of the live runs (seeds "
        f"{', '.join(map(str, plan.seeds))}), P99 over all of them with a 95% block-bootstrap "
        "interval; no network or gateway overhead. A scenario where either side holds fewer "
        f"than {stats.MIN_TAIL_SAMPLES} requests has no P99 to compare and is not ranked."
        + (
            f" Poisson arrivals at {plan.utilization:.0%} of the model's own capacity."
            if plan.utilization
            else ""
        ),
        "",
        "| Users | Instances | Simulated central queue P99 (s) [95% CI] | Per seed | "
        "Best live strategy | Its P99 (s) | vs central queue | HAProxy leastconn P99 (s) | "
        "Best vs HAProxy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for users, instances in plan.scenarios:
        live = [s for s in summaries if (s.users, s.instances) == (users, instances)]
        if any(s.strategy not in HAPROXY for s in live):
            rate = plan.utilization * modelled[(users, instances)] if plan.utilization else None
            found = central_queue_bound(plan, users, instances, rate)
            lines.append(f"| {users} | {instances} | {_bound_row(found, live)} |")
    return "\n".join(lines) + "\n"


def _bound_row(found: Bound, live: Sequence[Summary]) -> str:
    """The cells after the scenario: the bound, then the best of ours against it and against
    HAProxy leastconn, or why there is no ranking."""
    bound = found.interval
    cells = [
        f"{bound.estimate:.2f} [{bound.low:.2f}, {bound.high:.2f}]",
        ", ".join(f"{p99:.2f}" for p99 in found.per_seed),
    ]
    haproxy = next((s for s in live if s.strategy == "haproxy_leastconn"), None)
    fewest = min([found.samples, *(s.served for s in live)])
    if not stats.tail_measured(fewest):
        note = (
            f"too few samples to rank: {fewest} requests in the smallest window, "
            f"a P99 needs {stats.MIN_TAIL_SAMPLES}"
        )
        return " | ".join([*cells, note, "-", "-", "-", "-"])
    best = min((s for s in live if s.strategy not in HAPROXY), key=lambda s: s.p99_s)
    versus = f"{best.p99_s / haproxy.p99_s - 1:+.1%}" if haproxy else "not run"
    return " | ".join(
        [
            *cells,
            best.strategy,
            f"{best.p99_s:.2f}",
            f"{best.p99_s / bound.estimate - 1:+.1%}",
            f"{haproxy.p99_s:.2f}" if haproxy else "-",
            versus,
        ]
    )


def central_queue_bound(plan: Plan, users: int, instances: int, rate: float | None) -> Bound:
    """The simulated central queue over each of the plan's seeds, in the live runs' window."""
    results = [
        model.run(
            CENTRAL_QUEUE,
            users,
            instances,
            replace(plan.workload, seed=seed),
            rate=rate,
            warmup_s=plan.warmup_s,
            duration_s=plan.duration_s,
            slowdowns=(plan.slow,),
        )
        for seed in plan.seeds
    ]
    blocks = [b for r in results for b in r.blocks(plan.block_s)]
    samples = sum(len(r.latencies_s) for r in results)
    return Bound(stats.interval(blocks, stats.p99), [r.p99_s for r in results], samples)


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None or math.isnan(value) else fmt.format(value)
