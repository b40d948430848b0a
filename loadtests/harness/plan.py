"""The routing benchmark's command line: its one argument parser, the Plan a command line
builds, how long that plan takes (announced before it starts), and the full command that builds
the same Plan again (what each results folder keeps as command.txt, so the folder says exactly
how to reproduce it whatever the defaults become).

`--quick` is a smoke run: 20 users / 5 instances, random against least outstanding requests,
one seed, 8 s windows; every stage runs (capacity, live runs, model, tables, charts) in about a
minute on 2 cores. Its windows hold too few requests for a P99, and its tables say so."""

from __future__ import annotations

import argparse
import datetime
import shlex
from dataclasses import dataclass
from pathlib import Path

from loadtests.harness.runner import GENERATOR_TAIL_S
from loadtests.load.scenarios import (
    QUICK_SCENARIOS,
    SAGEMAKER_SCENARIOS,
    format_scenarios,
    parse_scenarios,
)
from loadtests.load.workload import Workload
from loadtests.sim import gateway as sim_gateway

PROG = "infergate bench"
CENTRAL_QUEUE = sim_gateway.CENTRAL_QUEUE
HAPROXY = {"haproxy_leastconn": "leastconn", "haproxy_random2": "random(2)"}
DEFAULT_STRATEGIES = (
    "random",
    "round_robin",
    "least_outstanding_requests",
    "power_of_two",
    "least_loaded",
    "least_outstanding_tokens",
    "peak_ewma",
    CENTRAL_QUEUE,
    *HAPROXY,
)
QUICK_STRATEGIES = ("random", "least_outstanding_requests")
QUICK_WARMUP_S, QUICK_DURATION_S = 2.0, 8.0
QUICK_BUDGET_S = 120.0  # README: `--quick` takes under two minutes on a 2-core machine
# What the plan costs beyond its load, measured on a 2-core machine shared with other work
# (simulated engine; 6 runs of 2 scenarios took 126 s): a run starts a front end and the load
# generator and keeps its samples; a scenario starts and stops its replicas; the bench imports,
# simulates the model and draws tables and charts.
RUN_OVERHEAD_S = 6.0
SCENARIO_OVERHEAD_S = 5.0
REPORT_S = 12.0


def known_front_ends() -> tuple[str, ...]:
    """Every registered policy (read now), the central queue and the HAProxy balances."""
    return (*sim_gateway.front_ends(), *HAPROXY)


@dataclass(frozen=True)
class Plan:
    scenarios: tuple[tuple[int, int], ...]
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    warmup_s: float
    duration_s: float
    block_s: float
    engine: str
    workload: Workload
    out: Path
    utilization: float | None  # open loop at this share of the measured capacity; None = closed
    gateways: int = 1  # front-end processes sharing the load (scenario b: two gateways)
    slow: float = 1.0  # replica 0 runs this many times slower (scenario c: 2 = half speed)

    @property
    def runs(self) -> int:
        """Load runs: one saturation run per scenario, then every seed and strategy."""
        return len(self.scenarios) * (1 + len(self.strategies) * len(self.seeds))


def expected_s(plan: Plan) -> float:
    """Wall time the plan takes: every run's load, and the costs around it."""
    run_s = plan.warmup_s + plan.duration_s + GENERATOR_TAIL_S + RUN_OVERHEAD_S
    return plan.runs * run_s + len(plan.scenarios) * SCENARIO_OVERHEAD_S + REPORT_S


def announce(plan: Plan) -> str:
    """What the bench says before it starts: how many runs and how long they take."""
    seconds = expected_s(plan)
    took = f"about {seconds:.0f} s" if seconds < 180 else f"about {seconds / 60:.0f} min"
    return f"{plan.runs} runs, {took}; results in {plan.out}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The SageMaker routing comparison.")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 20/5, random vs least_outstanding_requests, 1 seed, 8 s windows "
        "(about a minute; too few requests to rank strategies)",
    )
    p.add_argument("--engine", choices=["simulated", "torch"], default="simulated")
    p.add_argument("--scenarios", help="users/instances list, e.g. 4/1,20/5")
    p.add_argument("--strategies", help="comma-separated (default: every registered one)")
    p.add_argument("--seeds", type=int, help="runs per scenario and strategy (default 3)")
    p.add_argument("--warmup", type=float, help="seconds discarded at the start of each run")
    p.add_argument("--duration", type=float, help="measured seconds per run")
    p.add_argument("--block", type=float, default=3.0, help="bootstrap block length (s)")
    p.add_argument("--output-median", type=int, default=64, help="median output tokens")
    p.add_argument("--output-sigma", type=float, default=1.0, help="lognormal sigma")
    p.add_argument("--output-max", type=int, default=512)
    p.add_argument("--stream-share", type=float, default=0.5)
    p.add_argument(
        "--open-loop",
        dest="utilization",
        type=float,
        metavar="UTILIZATION",
        help="Poisson arrivals at this share of the capacity measured in the same run, e.g. 0.7",
    )
    p.add_argument("--gateways", type=int, default=1, help="front ends sharing the load")
    p.add_argument("--slow", type=float, default=1.0, help="replica 0 this many times slower")
    p.add_argument("--out", type=Path, help="results folder (default loadtests/results/<time>)")
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="FOLDER",
        help="recompute tables and charts of a finished run from its raw samples",
    )
    return p


def requested_strategies(args: argparse.Namespace) -> tuple[str, ...]:
    """The front ends a command line names (random first, always: the baseline)."""
    default = QUICK_STRATEGIES if args.quick else DEFAULT_STRATEGIES
    strategies = tuple(args.strategies.split(",")) if args.strategies else default
    unknown = [s for s in strategies if s not in known_front_ends()]
    if unknown:
        raise SystemExit(f"{PROG}: unknown strategies {unknown}; have {list(known_front_ends())}")
    return strategies if "random" in strategies else ("random", *strategies)


def build_plan(args: argparse.Namespace, strategies: tuple[str, ...] | None = None) -> Plan:
    quick = args.quick
    scenarios = (
        parse_scenarios(args.scenarios)
        if args.scenarios
        else (QUICK_SCENARIOS if quick else SAGEMAKER_SCENARIOS)
    )
    seeds = tuple(range(args.seeds if args.seeds else (1 if quick else 3)))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Plan(
        scenarios=scenarios,
        strategies=strategies or requested_strategies(args),
        seeds=seeds,
        warmup_s=args.warmup if args.warmup is not None else (QUICK_WARMUP_S if quick else 5.0),
        duration_s=args.duration
        if args.duration is not None
        else (QUICK_DURATION_S if quick else 15.0),
        block_s=args.block,
        engine=args.engine,
        workload=Workload(
            output_median=args.output_median,
            output_sigma=args.output_sigma,
            output_max=args.output_max,
            stream_share=args.stream_share,
        ),
        out=args.out or Path("loadtests/results") / stamp,
        utilization=args.utilization,
        gateways=args.gateways,
        slow=args.slow,
    )


def command_of(plan: Plan) -> str:
    """The command that builds this plan again, every option that affects a result spelled
    out (so a later change of defaults cannot change what it runs)."""
    w = plan.workload
    argv = [
        *PROG.split(),
        "--engine", plan.engine,
        "--scenarios", format_scenarios(plan.scenarios),
        "--strategies", ",".join(plan.strategies),
        "--seeds", str(len(plan.seeds)),
        "--warmup", f"{plan.warmup_s:g}",
        "--duration", f"{plan.duration_s:g}",
        "--block", f"{plan.block_s:g}",
        "--output-median", str(w.output_median),
        "--output-sigma", f"{w.output_sigma:g}",
        "--output-max", str(w.output_max),
        "--stream-share", f"{w.stream_share:g}",
        *(["--open-loop", f"{plan.utilization:g}"] if plan.utilization else []),
        "--gateways", str(plan.gateways),
        "--slow", f"{plan.slow:g}",
        "--out", str(plan.out),
    ]  # fmt: skip
    return shlex.join(argv)


def parse_command(command: str) -> argparse.Namespace:
    """A recorded `infergate bench ...` command line, parsed by the bench's own parser."""
    return recorded_args(command, PROG, parser())


def spelled_out(prog: str, tool: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """`prog` with every option of `tool` that `args` gives a value, in the parser's order
    (floats as `:g`, flags only when set); hidden options and unset ones are not written."""
    argv = prog.split()
    for action in tool._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.help == argparse.SUPPRESS or value is None:
            continue
        option = action.option_strings[-1]
        if isinstance(value, bool):  # a flag: written when set
            argv += [option] if value else []
        else:
            argv += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(argv)


def recorded_args(command: str, prog: str, tool: argparse.ArgumentParser) -> argparse.Namespace:
    """A result folder's recorded command line (`prog` and its options), parsed by `tool`."""
    words, head = shlex.split(command), prog.split()
    if words[: len(head)] != head:
        raise ValueError(f"not an `{prog}` command: {command!r}")
    return tool.parse_args(words[len(head) :])
