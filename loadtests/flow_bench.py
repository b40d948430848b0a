"""Flow control under load: a noisy neighbour, fairness between tenants, and a key's
tokens_per_minute across gateways.

Simulated-engine replicas (the 7B/A10G timing profile, 4 sequences each) behind one gateway
process, restarted with each configuration; the fleet's capacity is measured first in the same
run (closed-loop users, two per slot). Tenants name themselves with `X-Infergate-Tenant` and
`X-Infergate-Class` (no auth). Every number comes from raw per-request samples in the
measurement window (requests that ended in it, after a warm-up).

- noisy: tenant A (interactive, every request streamed) open-loop Poisson at 30% of capacity;
  tenant B (standard) closed loop with three users per slot. A's TTFT P99 alone, beside B with
  no flow control (the replicas queue), beside B in today's gateway FIFO queue
  (`limits.max_outstanding_per_replica: 4`), and beside B under flow control.
- fairness: tenants C and D in one class, both above capacity (closed loops, C with four times
  D's users): D's share of weighted tokens served (prompt + 2 x completion) under `fcfs` and
  `tokens`. Then E, whose outputs are four times F's, with as many users as F: E's share.
- limits: one key with tokens_per_minute L behind 2 gateways x 2 workers sharing a PostgreSQL
  store (started for the run), clients offering 3L: tokens served per minute.

    python -m loadtests.flow_bench [--replicas 4] [--seconds 40] [--only noisy,fairness,limits]

With `--out`, the folder gets table.md and command.txt (the full command).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from gateway.cluster import ClusterConfig, replica_urls, replicas_running, wait_ready
from loadtests.analysis.stats import percentile
from loadtests.harness.runner import (
    exit_on_sigterm,
    free_port_block,
    gateway_process,
    replica_config,
)
from loadtests.load.scenarios import INSTANCE_CONCURRENCY
from loadtests.load.sse import StreamCheck
from loadtests.load.workload import BOS_TOKENS, CompletionRequest, Workload, draw

PROG = "python -m loadtests.flow_bench"
OUTPUT_WEIGHT = 2  # flow_control.output_token_weight: what "weighted tokens" means here
CLASSES = [{"name": "interactive"}, {"name": "standard"}]
RESERVE = 25  # flow_control.reserve_percent of the noisy neighbour's last run: 1 slot in 4


@dataclass(frozen=True, slots=True)
class Sample:
    tenant: str
    start: float
    end: float
    ok: bool
    status: int
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int

    @property
    def weighted(self) -> int:
        return self.prompt_tokens + OUTPUT_WEIGHT * self.completion_tokens


@dataclass(frozen=True)
class Tenant:
    """One tenant's load: open loop at `rate` req/s, or `users` closed-loop users."""

    name: str
    workload: Workload
    klass: str = "standard"
    rate: float | None = None
    users: int = 0

    key: str | None = None  # an API key, sent as a bearer token

    def headers(self) -> dict[str, str]:
        if self.key is not None:
            return {"Authorization": f"Bearer {self.key}"}
        return {"X-Infergate-Tenant": self.name, "X-Infergate-Class": self.klass}


async def send(
    client: aiohttp.ClientSession, url: str, tenant: Tenant, request: CompletionRequest
) -> Sample:
    start, t0 = time.time(), time.perf_counter()
    body = request.body(tenant.workload.model, tenant.workload.seed)
    prompt = len(request.prompt.encode()) + BOS_TOKENS  # the byte-level tokenizer
    ttft, status, ok, completion = None, 0, False, 0
    try:
        async with client.post(
            f"{url}/v1/completions", json=body, headers=tenant.headers()
        ) as response:
            status = response.status
            if status == 200 and not request.stream:
                usage = (await response.json())["usage"]
                prompt, completion, ok = usage["prompt_tokens"], usage["completion_tokens"], True
            elif status == 200:
                check = StreamCheck()
                async for line in response.content:
                    if check.feed(line) and ttft is None:
                        ttft = time.perf_counter() - t0
                    if check.done:
                        break
                completion, ok = check.tokens, check.ok
            else:
                await response.read()
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    end = start + (time.perf_counter() - t0)
    return Sample(tenant.name, start, end, ok, status, ttft, prompt, completion)


async def closed_loop(
    client: aiohttp.ClientSession, url: str, tenant: Tenant, until: float, user: int
) -> list[Sample]:
    rng = random.Random(f"{tenant.name}:{tenant.workload.seed}:{user}")
    out = []
    while time.time() < until:
        out.append(await send(client, url, tenant, draw(tenant.workload, rng)))
    return out


async def open_loop(
    client: aiohttp.ClientSession, urls: list[str], tenant: Tenant, until: float
) -> list[Sample]:
    """Poisson arrivals, each to one of `urls` in turn (gateways behind one Service)."""
    assert tenant.rate is not None
    arrivals = random.Random(f"arrivals:{tenant.name}:{tenant.workload.seed}")
    requests = random.Random(f"{tenant.name}:{tenant.workload.seed}")
    tasks: list[asyncio.Task[Sample]] = []
    due = time.time()
    while True:
        due += arrivals.expovariate(tenant.rate)
        if due >= until:
            break
        await asyncio.sleep(max(0.0, due - time.time()))
        request = draw(tenant.workload, requests)
        url = urls[len(tasks) % len(urls)]
        tasks.append(asyncio.create_task(send(client, url, tenant, request)))
    return list(await asyncio.gather(*tasks))


@dataclass(frozen=True)
class Window:
    """The samples of one run that ended in its measurement window."""

    samples: list[Sample]
    seconds: float
    start: float = 0.0  # unix time the window opened

    def tokens_per_minute(self) -> float:
        """Prompt and completion tokens of the requests served, per minute."""
        tokens = sum(s.prompt_tokens + s.completion_tokens for s in self.samples if s.ok)
        return tokens / self.seconds * 60

    def minutes(self) -> list[int]:
        """Tokens served in each whole minute of the window (by the requests' ends)."""
        out = [0] * max(1, int(self.seconds // 60))
        for s in self.samples:
            minute = int((s.end - self.start) // 60)
            if s.ok and minute < len(out):
                out[minute] += s.prompt_tokens + s.completion_tokens
        return out

    def of(self, tenant: str) -> list[Sample]:
        return [s for s in self.samples if s.tenant == tenant]

    def rate(self, tenant: str | None = None) -> float:
        done = [s for s in self.samples if s.ok and (tenant is None or s.tenant == tenant)]
        return len(done) / self.seconds

    def weighted(self, tenant: str) -> int:
        return sum(s.weighted for s in self.of(tenant) if s.ok)

    def share(self, tenant: str) -> float:
        total = sum(s.weighted for s in self.samples if s.ok)
        return self.weighted(tenant) / total if total else float("nan")

    def ttft_p99(self, tenant: str) -> float:
        return percentile([s.ttft_s for s in self.of(tenant) if s.ok and s.ttft_s], 99)

    def failed(self, tenant: str) -> int:
        return sum(not s.ok for s in self.of(tenant))


async def run_tenants(
    urls: list[str], tenants: list[Tenant], warmup_s: float, seconds: float
) -> Window:
    start = time.time()
    until = start + warmup_s + seconds
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as client:
        jobs = []
        for tenant in tenants:
            if tenant.rate is not None:
                jobs.append(open_loop(client, urls, tenant, until))
            jobs += [closed_loop(client, urls[0], tenant, until, u) for u in range(tenant.users)]
        results = await asyncio.gather(*jobs)
    lo, hi = start + warmup_s, until
    kept = [s for samples in results for s in samples if lo <= s.end <= hi]
    return Window(kept, seconds, lo)


@dataclass
class Bench:
    args: argparse.Namespace
    urls: list[str]
    port: int
    workdir: Path
    log: IO[bytes]
    seed: int = 0

    @property
    def slots(self) -> int:
        replicas: int = self.args.replicas
        return replicas * INSTANCE_CONCURRENCY

    def workload(self, tenant: str, **changes: Any) -> Workload:
        base = Workload(seed=self.seed, output_sigma=self.args.output_sigma)
        return replace(base, seed=hash_seed(tenant, self.seed), **changes)

    def run(self, extra: dict[str, Any], tenants: list[Tenant]) -> Window:
        with gateway_process(
            self.urls, "least_outstanding_requests", self.seed, self.port, self.workdir,
            self.log, extra,
        ) as (url, _pid):  # fmt: skip
            return asyncio.run(run_tenants([url], tenants, self.args.warmup, self.args.seconds))


def hash_seed(tenant: str, seed: int) -> int:
    return seed * 1000 + sum(tenant.encode())


def flow(fairness: str, reserve_percent: float = 0) -> dict[str, Any]:
    return {
        "flow_control": {
            "classes": CLASSES, "default_class": "standard", "fairness": fairness,
            "output_token_weight": OUTPUT_WEIGHT, "queue_ttl_s": 600, "max_queued": 100_000,
            "reserve_percent": reserve_percent,
        },
        "timeouts": {"idle_s": 600, "first_byte_s": 600},
    }  # fmt: skip


FIFO = {
    "limits": {"max_outstanding_per_replica": INSTANCE_CONCURRENCY, "max_queue": 100_000,
               "queue_timeout_s": 600},
    "timeouts": {"idle_s": 600, "first_byte_s": 600},
}  # fmt: skip
NO_FLOW = {"timeouts": {"idle_s": 600, "first_byte_s": 600}}


def capacity(bench: Bench) -> Window:
    tenant = Tenant("capacity", bench.workload("capacity"), users=2 * bench.slots)
    return bench.run(NO_FLOW, [tenant])


def noisy(bench: Bench, cap: float) -> list[str]:
    a = Tenant("a", bench.workload("a", stream_share=1.0), "interactive", rate=0.3 * cap)
    b = Tenant("b", bench.workload("b"), "standard", users=3 * bench.slots)
    alone = bench.run(flow("tokens"), [a])
    runs = {
        "no flow control (replicas queue)": bench.run(NO_FLOW, [a, b]),
        "gateway FIFO queue (today's limits)": bench.run(FIFO, [a, b]),
        "flow control (A interactive, B standard)": bench.run(flow("tokens"), [a, b]),
        f"flow control, reserve_percent {RESERVE:g}": bench.run(flow("tokens", RESERVE), [a, b]),
    }
    base = alone.ttft_p99("a")
    fifo = runs["gateway FIFO queue (today's limits)"].rate()
    rows = [
        "| run | A TTFT P99 (s) | vs A alone | A req/s | B req/s | B / (capacity - A) "
        "| fleet req/s | vs FIFO | failed A, B |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| A alone | {base:.3f} | 1.00x | {alone.rate('a'):.2f} | - | - "
        f"| {alone.rate():.2f} | - | {alone.failed('a')}, - |",
    ]
    for name, w in runs.items():
        left = cap - w.rate("a")
        rows.append(
            f"| {name} | {w.ttft_p99('a'):.3f} | {w.ttft_p99('a') / base:.2f}x "
            f"| {w.rate('a'):.2f} | {w.rate('b'):.2f} | {w.rate('b') / left:.0%} "
            f"| {w.rate():.2f} | {w.rate() / fifo:.2f}x | {w.failed('a')}, {w.failed('b')} |"
        )
    return rows


def fairness(bench: Bench) -> list[str]:
    c = Tenant("c", bench.workload("c"), users=4 * bench.slots)
    d = Tenant("d", bench.workload("d"), users=bench.slots)
    short = max(1, bench.args.output_median // 4)  # E's outputs are the usual ones, F's short
    e = Tenant("e", bench.workload("e", output_median=4 * short), users=2 * bench.slots)
    f = Tenant("f", bench.workload("f", output_median=short), users=2 * bench.slots)
    rows = [
        "| tenants | fairness | share of weighted tokens served | its req/s | the other's req/s |",
        "|---|---|---|---|---|",
    ]
    for rule in ("fcfs", "tokens"):
        w = bench.run(flow(rule), [c, d])
        rows.append(
            f"| D (1x users) beside C (4x users) | {rule} | D: {w.share('d'):.1%} "
            f"| {w.rate('d'):.2f} | {w.rate('c'):.2f} |"
        )
    for rule in ("fcfs", "tokens"):
        w = bench.run(flow(rule), [e, f])
        rows.append(
            f"| E (outputs 4x F's) beside F, as many users | {rule} | E: {w.share('e'):.1%} "
            f"| {w.rate('e'):.2f} | {w.rate('f'):.2f} |"
        )
    return rows


KEY = "sk-flow-bench-0123456789"


def limits(bench: Bench, capacity_tokens_per_minute: float) -> list[str]:
    """One key's tokens_per_minute L behind 2 gateways x 2 workers sharing a PostgreSQL store;
    open-loop clients offering 3L, every request to the gateways in turn."""
    from loadtests.harness.pgserver import fresh_database, start_server

    args = bench.args
    limit = round(args.limit_share * capacity_tokens_per_minute)
    workload = bench.workload("k", stream_share=0.0)  # every answer names its usage
    rng = random.Random(0)
    draws = [draw(workload, rng) for _ in range(2000)]
    mean = sum(len(r.prompt.encode()) + BOS_TOKENS + r.max_tokens for r in draws) / len(draws)
    tenant = Tenant("k", workload, rate=3 * limit / 60 / mean, key=KEY)
    server = start_server()
    try:
        store = asyncio.run(fresh_database(server))
        extra = {
            "workers": 2,
            "auth": {"api_keys": [{"name": "k", "key": KEY,
                                   "limits": {"tokens_per_minute": limit}}]},
            "flow_control": {"store": store, "queue_ttl_s": 600, "max_queued": 100_000},
            "timeouts": {"idle_s": 600, "first_byte_s": 600},
        }  # fmt: skip
        with contextlib.ExitStack() as stack:
            urls = [
                stack.enter_context(
                    gateway_process(bench.urls, "least_outstanding_requests", bench.seed + g,
                                    bench.port + g, bench.workdir, bench.log, extra)
                )[0]
                for g in range(2)
            ]  # fmt: skip
            window = asyncio.run(run_tenants(urls, [tenant], 0.0, args.limit_seconds))
        version = server.version()
    finally:
        server.remove()
    refused = sum(s.status == 429 for s in window.samples)
    minutes = window.minutes()
    steady = minutes[1:] or minutes
    lines = [
        f"Key `tokens_per_minute` L = {limit} ({args.limit_share:.0%} of the fleet's measured "
        f"{capacity_tokens_per_minute:.0f} tokens/min); 2 gateway processes x `workers: 2`, "
        f"`flow_control.store` on PostgreSQL {version} (a server on loopback started for the "
        f"run); open loop offering 3L ({tenant.rate:.2f} req/s of {mean:.0f} tokens on average), "
        f"requests to the gateways in turn, {args.limit_seconds:g} s.",
        "",
        "| minute | tokens served | served / L |",
        "|---|---|---|",
        *(f"| {i + 1} | {n} | {n / limit:.2f} |" for i, n in enumerate(minutes)),
        f"| after the first (steady) | {sum(steady) / len(steady):.0f} "
        f"| {sum(steady) / len(steady) / limit:.2f} |",
        "",
        f"Requests: {sum(s.ok for s in window.samples)} served, {refused} refused with 429. "
        "A key starts with a full bucket (one minute's worth), so the first minute may serve "
        "up to 2L; from the second on the bucket only refills.",
        "",
        "LiteLLM proxy (`tpm_limit`, two instances): not measured here; it is not installed "
        "(an optional `peers` extra would carry it).",
    ]
    return lines


@contextlib.contextmanager
def fleet(args: argparse.Namespace, workdir: Path, log: IO[bytes]) -> Iterator[Bench]:
    config_path = workdir / "replica.yaml"
    config_path.write_text(yaml.safe_dump(replica_config("simulated", max_queue=100_000)))
    first = free_port_block(args.replicas + 4)  # the replicas, then up to 2 gateways
    cluster = ClusterConfig(
        replicas=args.replicas, engine="simulated", replica_config=config_path,
        first_replica_port=first, kv_events_port=None,
    )  # fmt: skip
    urls = replica_urls(cluster)
    with replicas_running(cluster, output=log) as procs:
        asyncio.run(wait_ready(urls, procs))
        yield Bench(args, urls, first + args.replicas, workdir, log, args.seed)


def report(args: argparse.Namespace, sections: dict[str, list[str]], cap: Window) -> list[str]:
    tokens = cap.tokens_per_minute()
    lines = [
        f"{args.replicas} simulated-engine replicas (7B/A10G profile, {INSTANCE_CONCURRENCY} "
        f"sequences each) behind one gateway process; machine: {os.cpu_count()} cores, "
        f"everything on it. Each run: {args.warmup:g} s warm-up, {args.seconds:g} s measured; "
        f"outputs lognormal, median {args.output_median}, sigma {args.output_sigma:g}; "
        f"seed {args.seed}.",
        "",
        f"Measured capacity: {cap.rate():.2f} req/s ({tokens:.0f} prompt and completion "
        f"tokens/min) completed with every slot full ({2 * args.replicas * INSTANCE_CONCURRENCY} "
        "closed-loop users, no flow control).",
    ]
    for title, rows in sections.items():
        lines += ["", f"### {title}", "", *rows]
    return lines


def main_sections(args: argparse.Namespace, workdir: Path, log: IO[bytes]) -> list[str]:
    only = set(args.only.split(","))
    sections: dict[str, list[str]] = {}
    with fleet(args, workdir, log) as bench:
        cap = capacity(bench)
        if "noisy" in only:
            sections["Noisy neighbour"] = noisy(bench, cap.rate())
        if "fairness" in only:
            sections["Fairness"] = fairness(bench)
        if "limits" in only:
            sections["Limits across gateways"] = limits(bench, cap.tokens_per_minute())
    return report(args, sections, cap)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=40.0, help="measured, per run")
    parser.add_argument("--warmup", type=float, default=5.0, help="before each measurement")
    parser.add_argument("--output-median", type=int, default=64)
    parser.add_argument("--output-sigma", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="noisy,fairness,limits", help="noisy,fairness,limits")
    parser.add_argument("--limit-seconds", type=float, default=180.0, help="the limits run")
    parser.add_argument("--limit-share", type=float, default=0.3, help="L / capacity")
    parser.add_argument("--out", type=Path, help="folder for table.md and command.txt")
    return parser


def command_of(args: argparse.Namespace) -> str:
    argv = [
        *PROG.split(),
        *("--replicas", str(args.replicas), "--seconds", f"{args.seconds:g}"),
        *("--warmup", f"{args.warmup:g}", "--output-median", str(args.output_median)),
        *("--output-sigma", f"{args.output_sigma:g}", "--seed", str(args.seed)),
        *("--only", args.only, "--limit-seconds", f"{args.limit_seconds:g}"),
        *("--limit-share", f"{args.limit_share:g}"),
    ]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return shlex.join(argv)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="flow-bench-") as tmp:
        workdir = Path(tmp)
        with (workdir / "fleet.log").open("ab") as log:
            table = "\n".join(main_sections(args, workdir, log))
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = command_of(args)
        (args.out / "command.txt").write_text(command + "\n")
        (args.out / "table.md").write_text(f"Command: `{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
