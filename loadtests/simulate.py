"""`python -m loadtests.simulate`: the discrete-event model of the routing benchmark
(loadtests/sim/model.py) as a table, for any scenarios and policies, in seconds of CPU instead of
the live run's minutes. Every policy registered in the gateway is simulated, and the central
queue.

    python -m loadtests.simulate --scenarios 20/5,80/20 --seconds 600
"""

from __future__ import annotations

import argparse

from loadtests.analysis import stats
from loadtests.load.scenarios import SAGEMAKER_SCENARIOS, parse_scenarios
from loadtests.load.workload import Workload
from loadtests.sim.gateway import front_ends
from loadtests.sim.model import capacity_rps, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.simulate", description=__doc__)
    p.add_argument("--scenarios", help="users/instances list (default: the SageMaker five)")
    p.add_argument("--policies", default=",".join(front_ends()))
    p.add_argument("--seconds", type=float, default=600.0, help="simulated seconds measured")
    p.add_argument("--warmup", type=float, default=30.0)
    p.add_argument("--output-sigma", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow", type=float, default=1.0, help="replica 0 step-time factor (2 = half)")
    p.add_argument(
        "--open-loop",
        dest="utilization",
        type=float,
        help="Poisson arrivals at this share of the modelled replicas' saturated rate",
    )
    p.add_argument("--gateways", type=int, default=1, help="gateways, each counting its own")
    args = p.parse_args(argv)
    workload = Workload(seed=args.seed, output_sigma=args.output_sigma)
    scenarios = parse_scenarios(args.scenarios) if args.scenarios else SAGEMAKER_SCENARIOS
    print(
        "| users / instances | policy | offered (req/s) | capacity (req/s) | P50 (s) | P99 (s) "
        "| P99 TTFT (s) | req/min/instance |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for users, instances in scenarios:
        capacity = capacity_rps(instances, workload, slowdowns=(args.slow,))
        rate = args.utilization * capacity if args.utilization else None
        for policy in args.policies.split(","):
            r = run(
                policy,
                users,
                instances,
                workload,
                rate=rate,
                warmup_s=args.warmup,
                duration_s=args.seconds,
                slowdowns=(args.slow,),
                gateways=args.gateways,
            )
            offered = f"{rate:.2f}" if rate else f"closed, {users} users"
            print(
                f"| {users}/{instances} | {policy} | {offered} | {capacity:.2f} | {r.p50_s:.2f} "
                f"| {r.p99_s:.2f} | {stats.percentile(r.ttfts_s, 99):.2f} "
                f"| {r.per_instance_per_min:.1f} |"
            )


if __name__ == "__main__":
    main()
