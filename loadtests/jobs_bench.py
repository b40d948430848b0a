"""Real-time latency with and without a large background batch of deferred jobs.

Simulated-engine replicas (the 7B/A10G timing profile) behind a gateway process with jobs on.
The same seeded open-loop real-time stream (Poisson arrivals, heavy-tailed output lengths, half
streamed) runs twice: alone, then while a batch fills the replicas' idle capacity. Percentiles
come from raw per-request samples; the report gives both, the change (pooled over seeds, with a
block-bootstrap interval), and how the batch went.

    python -m loadtests.jobs_bench [--replicas 4] [--rate 6] [--seconds 40] [--lines 400]
    python -m loadtests.jobs_bench --gateways 2 --seeds 3

With `--gateways N` (N > 1) the gateways share a PostgreSQL job store on a server the bench
starts on loopback (Debian's postgresql, as the tests use; loadtests/harness/pgserver.py), real-time
arrivals go to the gateways at random and the batch is submitted at the first. Each seed runs
on a fresh fleet and a fresh store.

With `--out`, the folder gets table.md and command.txt: the full command, every option spelled
out, that reproduces it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loadtests.analysis.stats import Block, blocks_of, p99, percentile, relative_change
from loadtests.harness.fleet import Fleet, fleet
from loadtests.harness.pgserver import fresh_database, start_server
from loadtests.harness.runner import exit_on_sigterm
from loadtests.load.openloop import run as open_loop
from loadtests.load.samples import Sample, write_samples
from loadtests.load.workload import DEFAULT_MODEL_LIMITS, Workload, draw


@dataclass(frozen=True)
class Phase:
    name: str
    samples: list[Sample]

    def latencies(self) -> list[float]:
        return [s.latency_s for s in self.samples if s.ok]

    def row(self, baseline: Phase | None) -> str:
        lat = self.latencies()
        median, tail = percentile(lat, 50), percentile(lat, 99)
        change = ""
        if baseline is not None:
            change = f"{(tail / percentile(baseline.latencies(), 99) - 1) * 100:+.1f}%"
        failed = len(self.samples) - len(lat)
        return f"| {self.name} | {len(lat)} | {failed} | {median:.3f} | {tail:.3f} | {change} |"


def batch_file(lines: int, tokens: int, seed: int) -> bytes:
    rng = random.Random(f"batch:{seed}")
    workload = Workload(seed=seed)
    out = []
    for i in range(lines):
        prompt = draw(workload, rng).prompt
        body = {"model": workload.model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
        out.append(json.dumps({"custom_id": f"line-{i}", "url": "/v1/completions", "body": body}))
    return "\n".join(out).encode()


async def batch_state(client: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with client.get(url) as response:
        state: dict[str, Any] = await response.json()
        return state


def done(state: dict[str, Any]) -> int:
    counts = state["request_counts"]
    return int(counts["completed"] + counts["failed"])


@dataclass(frozen=True)
class Run:
    """One seed: both phases and how the batch went."""

    seed: int
    alone: Phase
    loaded: Phase
    during: int  # batch lines done during the real-time phase
    elapsed_s: float  # from the submit until it completed (or the wait ran out)
    batch: str  # the batch line of the report

    def rows(self) -> list[str]:
        return [
            f"| {self.seed} {row}" for row in (self.alone.row(None), self.loaded.row(self.alone))
        ]


def blocks(phase: Phase, seconds: float) -> list[Block]:
    """The phase's successful requests in time blocks of about 5 s (by start time), for the
    block bootstrap."""
    ok = [s for s in phase.samples if s.ok]
    start = min((s.start_unix for s in phase.samples), default=0.0)
    n = max(2, round(seconds / 5))
    return blocks_of([s.start_unix for s in ok], [s.latency_s for s in ok], start, seconds, n)


def warmup_workload(workload: Workload) -> Workload:
    """Another seed's requests, fitted as the measured ones are."""
    return Workload(seed=workload.seed + 1).for_model(DEFAULT_MODEL_LIMITS)


async def measure(f: Fleet, args: argparse.Namespace, workload: Workload) -> Run:
    """Real time alone, then beside a batch submitted at the first gateway; real-time arrivals
    go to the gateways at random, as a Service spreads them."""
    hosts = ",".join(f.gateway_urls)
    await open_loop(hosts, args.rate, 5, warmup_workload(workload))
    alone = Phase("real time alone", await open_loop(hosts, args.rate, args.seconds, workload))
    async with aiohttp.ClientSession() as client:
        data = batch_file(args.lines, args.job_tokens, workload.seed)
        async with client.post(f"{f.gateway_url}/v1/batches", data=data) as response:
            assert response.status == 202, await response.text()
            path = response.headers["Location"]
        started = time.monotonic()
        loaded = Phase("with the batch", await open_loop(hosts, args.rate, args.seconds,
                                                         workload))  # fmt: skip
        during = done(await batch_state(client, f.gateway_url + path))
        while (state := await batch_state(client, f.gateway_url + path))["status"] == "in_progress":
            if time.monotonic() - started > args.seconds + args.drain_s:
                break
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - started
        views = [await batch_state(client, url + path) for url in f.gateway_urls]
    suffix = "" if args.seeds == 1 else f"-seed{workload.seed}"
    write_samples(args.out / f"alone{suffix}.csv", alone.samples)
    write_samples(args.out / f"with_batch{suffix}.csv", loaded.samples)
    counts = state["request_counts"]
    agree = "" if len(views) == 1 else (
        "; every gateway reports the same counts"
        if all(v["request_counts"] == counts for v in views)
        else f"; gateways DISAGREE on counts: {[v['request_counts'] for v in views]}"
    )  # fmt: skip
    batch = (
        f"batch: {args.lines} lines of {args.job_tokens} tokens; {during} done during the "
        f"{args.seconds:.0f} s real-time phase; status {state['status']} after {elapsed:.1f} s "
        f"({counts['completed']} completed, {counts['failed']} failed; "
        f"{done(state) / elapsed:.1f} lines/s){agree}"
    )
    return Run(workload.seed, alone, loaded, during, elapsed, batch)


def summary(args: argparse.Namespace, runs: list[Run], store: str) -> list[str]:
    """One row: P99 alone and beside the batch over every seed's samples, the change with its
    interval, and the batch's progress per seed."""
    loaded = [b for r in runs for b in blocks(r.loaded, args.seconds)]
    alone = [b for r in runs for b in blocks(r.alone, args.seconds)]
    change = relative_change(loaded, alone, p99)
    return [
        "| gateways | job store | `jobs.max_outstanding_per_replica` | seeds "
        "| real-time P99 alone → with the batch (s) | P99 change (95% interval) "
        "| batch lines done during the real-time phase | batch done after (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {args.gateways} | {store} | {args.threshold} | {len(runs)} "
        f"| {p99(alone):.2f} → {p99(loaded):.2f} "
        f"| {change.estimate:+.1%} ({change.low:+.1%} to {change.high:+.1%}) "
        f"| {', '.join(str(r.during) for r in runs)} of {args.lines} "
        f"| {', '.join(f'{r.elapsed_s:.0f}' for r in runs)} |",
    ]


def report(args: argparse.Namespace, runs: list[Run], store: str, short: str) -> list[str]:
    gateways = "1 gateway process" if args.gateways == 1 else (
        f"{args.gateways} gateway processes (real-time arrivals spread over them at random, "
        "the batch submitted at the first)"
    )  # fmt: skip
    return [
        f"{args.replicas} simulated-engine replicas (7B/A10G profile) behind {gateways}; "
        f"job store: {store}; open loop {args.rate:g} req/s for {args.seconds:.0f} s per phase; "
        f"machine: {os.cpu_count()} cores, everything on it.",
        "",
        "### Summary",
        "",
        *summary(args, runs, short),
        "",
        "P99 over every seed's real-time requests; the interval is a 95% block bootstrap "
        "(5 s blocks, both phases resampled).",
        "",
        "### Real-time latency alone and beside the batch",
        "",
        "| seed | phase | ok | failed | P50 (s) | P99 (s) | P99 change |",
        "|---|---|---|---|---|---|---|",
        *(row for run in runs for row in run.rows()),
        "",
        *(f"seed {run.seed}: {run.batch}" if len(runs) > 1 else run.batch for run in runs),
    ]


async def main_async(args: argparse.Namespace) -> list[str]:
    timeouts = {"connect_s": 1.0, "first_byte_s": 300.0, "idle_s": 300.0}
    runs = []
    with tempfile.TemporaryDirectory(prefix="jobs-store-") as tmp:
        server = None
        if args.gateways > 1:  # several gateways share a store only on PostgreSQL
            server = start_server()
        try:
            for seed in range(args.seed, args.seed + args.seeds):
                if server is not None:
                    store = await fresh_database(server)
                else:
                    store = str(Path(tmp) / f"jobs-{seed}.db")
                jobs = {"store": store, "max_outstanding_per_replica": args.threshold}
                workload = Workload(seed=seed, output_sigma=args.output_sigma)
                # The fleet's replicas are the default ones: every request must fit them.
                workload = workload.for_model(DEFAULT_MODEL_LIMITS)
                async with fleet(
                    args.out, args.replicas, gateways=args.gateways, jobs=jobs, timeouts=timeouts
                ) as f:
                    runs.append(await measure(f, args, workload))
            short = "SQLite" if server is None else f"PostgreSQL {server.version()}"
            label = "SQLite (a file)" if server is None else (
                f"{short} (a server on loopback, started for the run, fsync on)"
            )  # fmt: skip
        finally:
            if server is not None:
                server.remove()
    return report(args, runs, label, short)


PROG = "python -m loadtests.jobs_bench"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rate", type=float, default=6.0, help="real-time requests per second")
    parser.add_argument("--seconds", type=float, default=40.0, help="each real-time phase")
    parser.add_argument("--lines", type=int, default=400, help="batch lines")
    parser.add_argument("--job-tokens", type=int, default=32, help="max_tokens of each line")
    parser.add_argument("--threshold", type=int, default=2, help="jobs.max_outstanding_per_replica")
    parser.add_argument("--output-sigma", type=float, default=0.5, help="real-time output tail")
    parser.add_argument("--drain-s", type=float, default=60.0, help="wait for the batch after")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="runs, each on a fresh fleet")
    parser.add_argument(
        "--gateways", type=int, default=1,
        help="gateway processes; more than 1 share a PostgreSQL store started for the run",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for samples (default: a temp folder)")
    return parser


def command_of(args: argparse.Namespace) -> str:
    """The command with every option spelled out (defaults included)."""
    argv = [
        *PROG.split(),
        *("--replicas", str(args.replicas), "--rate", f"{args.rate:g}"),
        *("--seconds", f"{args.seconds:g}", "--lines", str(args.lines)),
        *("--job-tokens", str(args.job_tokens), "--threshold", str(args.threshold)),
        *("--output-sigma", f"{args.output_sigma:g}", "--drain-s", f"{args.drain_s:g}"),
        *("--seed", str(args.seed), "--seeds", str(args.seeds)),
        *("--gateways", str(args.gateways), "--out", str(args.out)),
    ]
    return shlex.join(argv)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    exit_on_sigterm()
    keep = args.out is not None
    with tempfile.TemporaryDirectory(prefix="jobs-bench-") as tmp:
        args.out = args.out or Path(tmp)
        args.out.mkdir(parents=True, exist_ok=True)
        table = "\n".join(asyncio.run(main_async(args)))
        print(table)
        if keep:
            command = command_of(args)
            (args.out / "command.txt").write_text(command + "\n")
            (args.out / "table.md").write_text(f"Command: `{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
