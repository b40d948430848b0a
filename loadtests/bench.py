"""`infergate bench`: the SageMaker routing comparison, reproduced for every strategy we ship.

For each scenario (users / instances: 4/1, 20/5, 40/10, 60/15, 80/20) it starts the replicas
once and first measures their capacity: a saturation run (closed-loop users, two per slot,
through least outstanding requests) whose completions per second are what these replicas do
with every slot full, on this machine, in this invocation. Open-loop arrival rates are shares
of that measured rate. Then for every seed and strategy it starts a gateway, drives closed-loop
Locust users (or open-loop Poisson arrivals) for warm-up + measurement time, and stops the
gateway. Everything is reported from raw samples: see loadtests/analysis/ (report.py, bound.py,
stats.py). The command line is loadtests/harness/plan.py.

Each simulated replica stands for one ml.g5.24xlarge instance of the published study: four
A10G GPUs with one model copy each, so four sequences run at once (`max_num_seqs: 4`, the 7B
A10G profile) and further requests queue at the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import yaml

from gateway.cluster import ClusterConfig, replica_urls, replicas_running, wait_ready
from gateway.yamlfile import load_yaml
from loadtests.analysis import bound, report
from loadtests.analysis.report import Scenario
from loadtests.harness.plan import (
    CENTRAL_QUEUE,
    HAPROXY,
    Plan,
    announce,
    build_plan,
    command_of,
    parse_command,
    parser,
    requested_strategies,
)
from loadtests.harness.runner import (
    RunResult,
    RunSpec,
    exit_on_sigterm,
    free_port_block,
    gateway_process,
    haproxy_available,
    haproxy_process,
    replica_config,
    run_load,
)
from loadtests.load.samples import read_samples_from
from loadtests.load.scenarios import INSTANCE_CONCURRENCY, saturation_users
from loadtests.sim.gateway import CENTRAL_QUEUE_POLICY

SATURATION = "saturation"  # the capacity run, as named in samples/ and capacity.csv
CAPACITY_POLICY = "least_outstanding_requests"


@dataclass(frozen=True)
class Finished:
    """A finished benchmark: its plan, every strategy's runs, and each scenario's saturation
    run (the capacity its open-loop rates are shares of)."""

    plan: Plan
    results: list[RunResult]
    saturation: dict[Scenario, RunResult]

    def loads(self) -> dict[Scenario, report.Load]:
        loads = {}
        for scenario, run in self.saturation.items():
            capacity = report.completed_rps(run)
            target = self.plan.utilization * capacity if self.plan.utilization else None
            loads[scenario] = report.Load(capacity, target)
        return loads


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
                lor = CENTRAL_QUEUE_POLICY
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

    data = load_yaml(BUILTIN_PROFILE.read_text(encoding="utf-8"))
    for key in ("prefill_base_s", "prefill_s_per_token", "decode_base_s", "decode_per_seq_s"):
        data["generation"][key] *= factor
    data["name"] = f"{data['name']} x{factor:g} slower"
    path = workdir / "slow-profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def saturation_spec(plan: Plan, users: int, instances: int) -> RunSpec:
    """The capacity run of a scenario: enough closed-loop users that no slot ever idles."""
    seed = plan.seeds[0]
    workload = replace(plan.workload, seed=seed)
    return RunSpec(
        saturation_users(instances),
        instances,
        SATURATION,
        seed,
        plan.warmup_s,
        plan.duration_s,
        workload,
    )


def run_plan(plan: Plan, log: IO[bytes]) -> Finished:
    finished = Finished(plan, [], {})
    started = time.monotonic()
    workdir = plan.out / "tmp"
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "replica.yaml"
    config_path.write_text(yaml.safe_dump(replica_config(plan.engine)))
    extra = {0: ["--profile", str(slow_profile(plan.slow, workdir))]} if plan.slow != 1 else {}
    done = 0

    def one(spec: RunSpec, front: Plan, strategy: str, urls: list[str], port: int) -> RunResult:
        nonlocal done
        progress(done, plan.runs, spec, started)
        with front_ends(front, strategy, spec.seed, urls, port, workdir, log) as (url, pids):
            result = run_load(spec, url, pids, workdir, log)
        report.keep_samples(plan.out, result, workdir / "samples.csv")
        done += 1
        return result

    for users, instances in plan.scenarios:
        first_port = free_port_block(instances + plan.gateways)
        cluster = ClusterConfig(
            replicas=instances,
            engine=plan.engine,
            replica_config=config_path,
            first_replica_port=first_port,
            kv_events_port=None,
        )
        urls, port = replica_urls(cluster), first_port + instances
        with replicas_running(cluster, output=log, extra_args=extra) as procs:
            asyncio.run(wait_ready(urls, procs))
            spec = saturation_spec(plan, users, instances)
            saturation = one(spec, replace(plan, gateways=1), CAPACITY_POLICY, urls, port)
            finished.saturation[(users, instances)] = saturation
            capacity = report.completed_rps(saturation)
            rate = plan.utilization * capacity if plan.utilization else None
            for seed in plan.seeds:
                for strategy in plan.strategies:
                    workload = replace(plan.workload, seed=seed)
                    spec = RunSpec(
                        users, instances, strategy, seed, plan.warmup_s, plan.duration_s,
                        workload, rate,
                    )  # fmt: skip
                    finished.results.append(one(spec, plan, strategy, urls, port))
    shutil.rmtree(workdir, ignore_errors=True)
    return finished


def write_results(finished: Finished) -> list[Path]:
    plan, loads = finished.plan, finished.loads()
    summaries = report.summarize(finished.results, plan.block_s, loads)
    command = command_of(plan)
    mode = (
        f"open loop, Poisson arrivals at {plan.utilization:.0%} of the capacity measured in "
        "this run"
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
    modelled = bound.modelled_capacity(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "table.md").write_text(
        report.markdown(summaries, f"{header}\n\n{bound.load_section(plan, loads, modelled)}")
        + "\n"
        + bound.against_bound(plan, summaries, modelled)
    )
    report.write_csv(plan.out / "summary.csv", summaries)
    report.write_runs_csv(plan.out / "runs.csv", finished.results)
    report.write_capacity_csv(plan.out / "capacity.csv", finished.saturation)
    (plan.out / "command.txt").write_text(command + "\n")
    paths = [plan.out / name for name in ("table.md", "summary.csv", "runs.csv", "capacity.csv")]
    return paths + report.charts(plan.out, summaries)


def load_results(folder: Path) -> Finished:
    """Rebuild a finished benchmark from its folder (command, runs.csv, capacity.csv, raw
    samples). A folder from before capacity was measured has no capacity.csv."""
    args = parse_command((folder / "command.txt").read_text().strip())
    plan = replace(build_plan(args), out=folder)
    runs = [run for _, run in _rebuild(folder, plan, folder / "runs.csv")]
    saturation = {
        (int(row["scenario_users"]), run.spec.instances): run
        for row, run in _rebuild(folder, plan, folder / "capacity.csv")
    }
    return Finished(plan, runs, saturation)


def _rebuild(folder: Path, plan: Plan, table: Path) -> Iterator[tuple[dict[str, str], RunResult]]:
    if not table.exists():
        return
    with table.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        users, instances, seed = int(row["users"]), int(row["instances"]), int(row["seed"])
        workload = replace(plan.workload, seed=seed)
        strategy = row["strategy"]
        spec = RunSpec(users, instances, strategy, seed, plan.warmup_s, plan.duration_s, workload)
        name = f"u{users}-n{instances}-{strategy}-seed{seed}.csv.gz"
        with gzip.open(folder / "samples" / name, "rt") as raw:
            samples = read_samples_from(raw)
        first = min(s.start_unix for s in samples)
        cpu = (row["cpu_machine_mean"], row["cpu_generator_p90"], row["cpu_gateway_p90"])
        yield row, RunResult(spec, samples, first + plan.warmup_s, *map(float, cpu))


def runnable(strategies: tuple[str, ...]) -> tuple[str, ...]:
    """`strategies` less the HAProxy ones when haproxy is not installed (with a notice)."""
    missing = [s for s in strategies if s in HAPROXY and not haproxy_available()]
    if missing:
        print(f"notice: haproxy is not installed; skipping {', '.join(missing)}", flush=True)
    return tuple(s for s in strategies if s not in missing)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    exit_on_sigterm()
    if args.report_only:
        for path in write_results(load_results(args.report_only)):
            print(f"wrote {path}")
        return 0
    plan = build_plan(args, runnable(requested_strategies(args)))
    plan.out.mkdir(parents=True, exist_ok=True)
    print(announce(plan), flush=True)
    if args.quick:
        print(
            "--quick is a smoke run: every stage once, on windows too short to rank strategies",
            flush=True,
        )
    print(command_of(plan), flush=True)
    with (plan.out / "run.log").open("wb") as log:
        finished = run_plan(plan, log)
    for path in write_results(finished):
        print(f"wrote {path}")
    print((plan.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
