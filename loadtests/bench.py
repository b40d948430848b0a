"""`infergate bench`: the SageMaker routing comparison, reproduced for every strategy we ship.

For each scenario (users / instances: 4/1, 20/5, 40/10, 60/15, 80/20) it starts the replicas
once, then for every seed and strategy starts a gateway, drives closed-loop Locust users (or
open-loop Poisson arrivals) for warm-up + measurement time, and stops the gateway. Everything
is reported from raw samples: see loadtests/report.py and loadtests/stats.py.

Each simulated replica stands for one ml.g5.24xlarge instance of the published study: four
A10G GPUs with one model copy each, so four sequences run at once (`max_num_seqs: 4`, the 7B
A10G profile) and further requests queue at the instance.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime
import gzip
import random
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import yaml

from gateway.cluster import ClusterConfig, replica_urls, replicas_running, wait_ready
from gateway.policies import POLICIES
from loadtests import report
from loadtests.runner import (
    RunResult,
    RunSpec,
    free_port_block,
    gateway_process,
    haproxy_available,
    haproxy_process,
    run_load,
)
from loadtests.samples import read_samples_from
from loadtests.workload import Workload, output_tokens

SAGEMAKER_SCENARIOS = ((4, 1), (20, 5), (40, 10), (60, 15), (80, 20))
QUICK_SCENARIOS = ((4, 1), (20, 5))
INSTANCE_CONCURRENCY = 4  # sequences one instance runs at once (4 GPUs, one model copy each)

# Front ends besides our strategies: the gateway as a central queue (least outstanding with a
# per-replica limit equal to the instance's concurrency, the rest waiting at the gateway), and
# HAProxy in front of the same replicas when it is installed.
CENTRAL_QUEUE = "central_queue"
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
FRONT_ENDS = (*POLICIES, CENTRAL_QUEUE, *HAPROXY)


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
    utilization: float | None  # open loop at this share of nominal capacity; None = closed
    gateways: int = 1  # front-end processes sharing the load (scenario b: two gateways)
    slow: float = 1.0  # replica 0 runs this many times slower (scenario c: 2 = half speed)

    @property
    def runs(self) -> int:
        return len(self.scenarios) * len(self.strategies) * len(self.seeds)


def replica_config(engine: str) -> dict[str, object]:
    batcher = {
        "kind": "continuous",
        "max_num_seqs": INSTANCE_CONCURRENCY,
        "max_batch_tokens": 8192,
        "max_queue": 4096,
        "queue_timeout_ms": 600_000,
    }
    model = {
        "kind": "tiny-gpt",
        "max_tokens_limit": 1024,
        "batcher": batcher,
        "params": {"context_len": 2048},
    }
    return {"engine": {"kind": engine}, "models": [model]}


def nominal_capacity_rps(workload: Workload) -> float:
    """Requests/s one simulated instance completes when always full: an estimate from the
    built-in profile, used only to set open-loop arrival rates."""
    from replica.engines.profile import load_profile  # the profile reader, not torch

    gen = load_profile().generation
    rng = random.Random(0)
    mean_out = statistics.fmean(output_tokens(workload, rng) for _ in range(20_000))
    step = gen.decode_base_s + gen.decode_per_seq_s * INSTANCE_CONCURRENCY
    prompt_tokens = 6 * (workload.prompt_words_min + workload.prompt_words_max) / 2
    prefill = gen.prefill_base_s + gen.prefill_s_per_token * prompt_tokens
    return INSTANCE_CONCURRENCY / (prefill + mean_out * step)


def progress(i: int, total: int, spec: RunSpec, started: float) -> None:
    elapsed = time.monotonic() - started
    eta = elapsed / i * (total - i) if i else float("nan")
    print(
        f"[{i + 1:3d}/{total}] {spec.users:3d} users / {spec.instances:2d} instances  "
        f"{spec.strategy:28s} seed {spec.seed}   elapsed {elapsed:5.0f} s, "
        f"left ~{eta:4.0f} s",
        flush=True,
    )


@contextlib.contextmanager
def front_ends(
    plan: Plan,
    strategy: str,
    seed: int,
    urls: list[str],
    first_port: int,
    workdir: Path,
    log: IO[bytes],
) -> Iterator[tuple[str, list[int]]]:
    """`plan.gateways` front ends for this strategy: comma-joined URLs, and their pids."""
    with contextlib.ExitStack() as stack:
        listen, pids = [], []
        for g in range(plan.gateways):
            port = first_port + g
            if strategy in HAPROXY:
                front = haproxy_process(urls, HAPROXY[strategy], port, workdir, log)
            elif strategy == CENTRAL_QUEUE:
                per_gateway = max(1, INSTANCE_CONCURRENCY // plan.gateways)
                limits = {
                    "max_outstanding_per_replica": per_gateway,
                    "max_queue": 100_000,
                    "queue_timeout_s": 600,
                }
                lor = "least_outstanding_requests"
                extra = {"limits": limits}
                front = gateway_process(urls, lor, seed + g, port, workdir, log, extra)
            else:
                front = gateway_process(urls, strategy, seed + g, port, workdir, log)
            url, pid = stack.enter_context(front)
            listen.append(url)
            pids.append(pid)
        yield ",".join(listen), pids


def slow_profile(factor: float, workdir: Path) -> Path:
    """The built-in profile with every generation time multiplied by `factor`."""
    from replica.engines.profile import BUILTIN_PROFILE

    data = yaml.safe_load(BUILTIN_PROFILE.read_text())
    for key in ("prefill_base_s", "prefill_s_per_token", "decode_base_s", "decode_per_seq_s"):
        data["generation"][key] *= factor
    data["name"] = f"{data['name']} x{factor:g} slower"
    path = workdir / "slow-profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_plan(plan: Plan, log: IO[bytes]) -> list[RunResult]:
    results: list[RunResult] = []
    started = time.monotonic()
    workdir = plan.out / "tmp"
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "replica.yaml"
    config_path.write_text(yaml.safe_dump(replica_config(plan.engine)))
    capacity = nominal_capacity_rps(plan.workload) if plan.utilization else 0.0
    extra = {0: ["--profile", str(slow_profile(plan.slow, workdir))]} if plan.slow != 1 else {}
    for users, instances in plan.scenarios:
        first_port = free_port_block(instances + plan.gateways)
        cluster = ClusterConfig(
            replicas=instances,
            engine=plan.engine,
            replica_config=config_path,
            first_replica_port=first_port,
        )
        urls = replica_urls(cluster)
        with replicas_running(cluster, output=log, extra_args=extra) as procs:
            asyncio.run(wait_ready(urls, procs))
            for seed in plan.seeds:
                for strategy in plan.strategies:
                    rate = plan.utilization * capacity * instances if plan.utilization else None
                    spec = RunSpec(
                        users,
                        instances,
                        strategy,
                        seed,
                        plan.warmup_s,
                        plan.duration_s,
                        replace(plan.workload, seed=seed),
                        rate,
                    )
                    progress(len(results), plan.runs, spec, started)
                    port = first_port + instances
                    with front_ends(plan, strategy, seed, urls, port, workdir, log) as front:
                        result = run_load(spec, front[0], front[1], workdir, log)
                    report.keep_samples(plan.out, result, workdir / "samples.csv")
                    results.append(result)
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def write_results(plan: Plan, results: list[RunResult], command: str) -> list[Path]:
    summaries = report.summarize(results, plan.block_s)
    mode = (
        f"open loop, Poisson arrivals at {plan.utilization:.0%} of nominal capacity"
        if plan.utilization
        else "closed loop (each user waits for its answer)"
    )
    setup = ""
    if plan.gateways > 1:
        setup += f" {plan.gateways} front ends share the load (users split evenly among them)."
    if plan.slow != 1:
        setup += f" Replica 0 runs {plan.slow:g}x slower than the others."
    header = (
        f"Engine: {plan.engine} (7B on A10G profile, {INSTANCE_CONCURRENCY} sequences per "
        f"instance); {mode}; {len(plan.seeds)} seeds x {plan.duration_s:.0f} s measured "
        f"after {plan.warmup_s:.0f} s warm-up per run.{setup} Command: `{command}`"
    )
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "table.md").write_text(
        report.markdown(summaries, header) + "\n" + against_bound(plan, summaries)
    )
    report.write_csv(plan.out / "summary.csv", summaries)
    report.write_runs_csv(plan.out / "runs.csv", results)
    (plan.out / "command.txt").write_text(command + "\n")
    paths = [plan.out / "table.md", plan.out / "summary.csv", plan.out / "runs.csv"]
    return paths + report.charts(plan.out, summaries)


def against_bound(plan: Plan, summaries: list[report.Summary]) -> str:
    """Each scenario's best live P99 against the simulated central queue (the queueing bound
    for this workload and these replicas) and against HAProxy leastconn, when it ran."""
    from loadtests import simulate

    lines = [
        "### Against the ideal and HAProxy",
        "",
        "Simulated central queue: `loadtests/simulate.py`, the same workload and replica model, "
        "600 simulated seconds, no network or gateway overhead.",
        "",
        "| Users | Instances | Simulated central queue P99 (s) | Best live strategy | "
        "Its P99 (s) | vs central queue | HAProxy leastconn P99 (s) | Best vs HAProxy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    capacity = nominal_capacity_rps(plan.workload) if plan.utilization else 0.0
    for users, instances in plan.scenarios:
        bound = next(
            simulate.results(
                ((users, instances),),
                (simulate.CENTRAL_QUEUE,),
                plan.workload,
                warmup_s=30.0,
                duration_s=600.0,
                utilization=plan.utilization,
                capacity_rps=capacity,
                slowdowns=(plan.slow,),
            )
        )
        live = [s for s in summaries if (s.users, s.instances) == (users, instances)]
        ours = [s for s in live if s.strategy not in HAPROXY]
        if not ours:
            continue
        best = min(ours, key=lambda s: s.p99_s)
        haproxy = next((s for s in live if s.strategy == "haproxy_leastconn"), None)
        versus = f"{best.p99_s / haproxy.p99_s - 1:+.1%}" if haproxy else "not run"
        lines.append(
            f"| {users} | {instances} | {bound.p99_s:.2f} | {best.strategy} | "
            f"{best.p99_s:.2f} | {best.p99_s / bound.p99_s - 1:+.1%} | "
            f"{f'{haproxy.p99_s:.2f}' if haproxy else '-'} | {versus} |"
        )
    return "\n".join(lines) + "\n"


def parse_scenarios(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in text.split(","):
        users, _, instances = item.partition("/")
        pairs.append((int(users), int(instances)))
    return tuple(pairs)


def build_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    scenarios = (
        parse_scenarios(args.scenarios)
        if args.scenarios
        else (QUICK_SCENARIOS if quick else SAGEMAKER_SCENARIOS)
    )
    strategies = tuple(args.strategies.split(",")) if args.strategies else DEFAULT_STRATEGIES
    unknown = [s for s in strategies if s not in FRONT_ENDS]
    if unknown:
        raise SystemExit(f"infergate bench: unknown strategies {unknown}; have {list(FRONT_ENDS)}")
    missing = [s for s in strategies if s in HAPROXY and not haproxy_available()]
    if missing:
        print(f"notice: haproxy is not installed; skipping {', '.join(missing)}", flush=True)
        strategies = tuple(s for s in strategies if s not in missing)
    if "random" not in strategies:
        strategies = ("random", *strategies)
    seeds = tuple(range(args.seeds if args.seeds else (1 if quick else 3)))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Plan(
        scenarios=scenarios,
        strategies=strategies,
        seeds=seeds,
        warmup_s=args.warmup if args.warmup is not None else (3.0 if quick else 5.0),
        duration_s=args.duration if args.duration is not None else (8.0 if quick else 15.0),
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infergate bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 scenarios, 1 seed, short runs (< 2 min)")
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
        help="Poisson arrivals at this share of nominal capacity, e.g. 0.7",
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


def load_results(folder: Path) -> tuple[Plan, list[RunResult], str]:
    """Rebuild a finished benchmark's runs from its folder (command, runs.csv, raw samples)."""
    command = (folder / "command.txt").read_text().strip()
    plan = replace(build_plan(parser().parse_args(shlex.split(command)[2:])), out=folder)
    results = []
    with (folder / "runs.csv").open() as f:
        for row in csv.DictReader(f):
            users, instances, seed = int(row["users"]), int(row["instances"]), int(row["seed"])
            spec = RunSpec(
                users,
                instances,
                row["strategy"],
                seed,
                plan.warmup_s,
                plan.duration_s,
                replace(plan.workload, seed=seed),
            )
            name = f"u{users}-n{instances}-{row['strategy']}-seed{seed}.csv.gz"
            with gzip.open(folder / "samples" / name, "rt") as raw:
                samples = read_samples_from(raw)
            first = min(s.start_unix for s in samples)
            results.append(
                RunResult(
                    spec,
                    samples,
                    first + plan.warmup_s,
                    float(row["cpu_machine_mean"]),
                    float(row["cpu_generator_p90"]),
                    float(row["cpu_gateway_p90"]),
                )
            )
    return plan, results, command


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.report_only:
        plan, results, command = load_results(args.report_only)
        for path in write_results(plan, results, command):
            print(f"wrote {path}")
        return 0
    plan = build_plan(args)
    command = "infergate bench " + shlex.join(argv)
    plan.out.mkdir(parents=True, exist_ok=True)
    print(
        f"{plan.runs} runs, about {plan.runs * (plan.warmup_s + plan.duration_s + 4) / 60:.0f}"
        f" min; results in {plan.out}",
        flush=True,
    )
    with (plan.out / "run.log").open("wb") as log:
        results = run_plan(plan, log)
    for path in write_results(plan, results, command):
        print(f"wrote {path}")
    print((plan.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
