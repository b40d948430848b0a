"""The live benchmark beside the model (loadtests/simulate.py), as two sections of table.md:

- each scenario's offered load and capacity: the rate the saturation run measured on the live
  replicas, and the modelled replicas' saturated rate for the same workload;
- each scenario's best live P99 against the simulated central queue (the queueing bound for this
  workload on these replicas) over the same seeds as the live runs, with a 95% block-bootstrap
  interval, and against HAProxy leastconn when it ran.

The model and the live report select requests the same way: those that ended in the window
after the warm-up. An open-loop bound is simulated at the same share of the model's saturated
rate as the live runs are offered of the measured one (the same "85%" on both sides; when the two
capacities differ, the load section shows by how much), so a model that is a little slower than
the live replicas is never pushed past its own capacity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

from loadtests import sim_gateway, simulate, stats
from loadtests.plan import HAPROXY, Plan
from loadtests.report import UNMEASURED, Load, Scenario, Summary
from loadtests.scenarios import SATURATION_USERS_PER_SLOT

BOUND_WARMUP_S, BOUND_SECONDS = 30.0, 600.0  # per simulated seed


def modelled_capacity(plan: Plan) -> dict[Scenario, float]:
    """Each scenario's saturated rate on the model (requests/s, all instances together)."""
    workload = replace(plan.workload, seed=plan.seeds[0])
    return {
        (users, instances): simulate.capacity_rps(
            instances,
            workload,
            slowdowns=(plan.slow,),
            warmup_s=BOUND_WARMUP_S,
            duration_s=BOUND_SECONDS,
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
        f"same on the model, {BOUND_SECONDS:g} s. Offered: requests sent per second in the "
        "window (per strategy in the detail table).",
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
        "Simulated central queue: `loadtests/simulate.py`, the same workload and replica model, "
        f"one run of {BOUND_SECONDS:g} simulated seconds per seed of the live runs (seeds "
        f"{', '.join(map(str, plan.seeds))}), P99 over all of them with a 95% block-bootstrap "
        "interval; no network or gateway overhead."
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
        ours = [s for s in live if s.strategy not in HAPROXY]
        if not ours:
            continue
        rate = plan.utilization * modelled[(users, instances)] if plan.utilization else None
        bound, per_seed = central_queue_bound(plan, users, instances, rate)
        best = min(ours, key=lambda s: s.p99_s)
        haproxy = next((s for s in live if s.strategy == "haproxy_leastconn"), None)
        versus = f"{best.p99_s / haproxy.p99_s - 1:+.1%}" if haproxy else "not run"
        lines.append(
            f"| {users} | {instances} | {bound.estimate:.2f} [{bound.low:.2f}, "
            f"{bound.high:.2f}] | {per_seed} | {best.strategy} | {best.p99_s:.2f} | "
            f"{best.p99_s / bound.estimate - 1:+.1%} | "
            f"{f'{haproxy.p99_s:.2f}' if haproxy else '-'} | {versus} |"
        )
    return "\n".join(lines) + "\n"


def central_queue_bound(
    plan: Plan, users: int, instances: int, rate: float | None
) -> tuple[stats.Interval, str]:
    """The simulated central queue's P99 over the plan's seeds (pooled, with an interval),
    and each seed's own P99."""
    results = [
        simulate.run(
            sim_gateway.CENTRAL_QUEUE,
            users,
            instances,
            replace(plan.workload, seed=seed),
            rate=rate,
            warmup_s=BOUND_WARMUP_S,
            duration_s=BOUND_SECONDS,
            slowdowns=(plan.slow,),
        )
        for seed in plan.seeds
    ]
    blocks = [b for r in results for b in r.blocks(plan.block_s)]
    return stats.interval(blocks, stats.p99), ", ".join(f"{r.p99_s:.2f}" for r in results)


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None or math.isnan(value) else fmt.format(value)
