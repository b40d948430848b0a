"""Prefix-aware routing benchmark: multi-turn chats over shared system prompts, and a
unique-prompt control, through every front end in front of the same simulated replicas (prefix
cache on), in one run.

    python -m loadtests.prefix_bench [--replicas 5] [--loads closed,0.7] [--seeds 2]
        [--warmup-s 10] [--duration-s 30] [--workloads chat-prefix,kv-pressure,unique]
        [--front-ends ...] [--instances 1,3] [--hashes own|vllm] [--out DIR]

Workloads (seeded; every front end sees the same conversations):
- `chat-prefix`: 8 system prompts of 500-2,000 tokens; each conversation picks one, then sends
  3-6 turns (a 20-80 word question each, the whole history re-sent every turn, the reply
  appended as generated).
- `kv-pressure`: the same conversations over system prompts of 1,500-3,000 tokens, as many as
  it takes for their tokens to reach the fleet's KV capacity (replicas x the simulated
  profile's KV tokens): several tens, more than the caches hold, so blocks are evicted.
- `unique`: single requests with a prompt of the same length range as chat-prefix's that
  shares nothing.

Loads, per workload and seed:
- `closed`: closed loop, two users per sequence slot of the fleet (so no slot idles), each
  running conversations back to back with no think time. `least_outstanding_requests` runs it
  first, as one instance: the requests/s it completes in the window is the fleet's measured
  capacity for that workload and seed.
- a share such as `0.7`: open loop, new conversations arriving as a Poisson process so that this
  share of that measured capacity is offered, with exponential think time between turns.

Front ends (loadtests/harness/routers.py): our gateway with `random`,
`least_outstanding_requests`, `affinity`, `prefix_aware`, `precise_prefix` (polling each
replica's GET /cache/blocks) and `precise_prefix:events` (following the replicas' KV cache
events); and, when installed (`pip install -e '.[peers]'`), `sglang-router` with `cache_aware`
and `power_of_two` and `vllm-router` with `cache_aware` and `consistent_hash`, at their
defaults; a missing one is skipped with a notice. Each runs as every count of `--instances`:
that many processes with the same config, each request sent to one of them chosen at random
(what a plain load balancer in front of several gateways does). Every run starts fresh
replicas, so no front end inherits another's caches; they publish KV cache events in every run
(same replicas for every front end), with their own block hashes or, with `--hashes vllm`,
vLLM-like ones that no router can reproduce. Requests are streamed OpenAI chat completions
with `X-Session-Id: <conversation>` and `stream_options.include_usage`, so each sample carries
the prompt tokens and the cached tokens the replica reports.

Measured, from raw samples: of the requests sent inside the window (each waited for with the
load kept on), TTFT P50/P90/P99, end-to-end P99, the fleet's cache hit rate (cached / prompt
tokens); completions that ended inside the window per minute per front-end instance; the load
spread (each replica's share of the chat requests, from its own metrics; max over mean); the KV
blocks the replicas stored and evicted over the run, from their events
(loadtests/harness/kv_watch.py). Intervals: 95% block bootstrap over the pooled seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.cluster import (
    ClusterConfig,
    kv_endpoints,
    replica_urls,
    replicas_running,
    wait_ready,
)
from loadtests.analysis import stats
from loadtests.harness.kv_watch import KvWatch
from loadtests.harness.plan import recorded_args
from loadtests.harness.routers import OURS, PEERS, PORTS_PER_INSTANCE, Fleet, available, front_ends
from loadtests.harness.runner import exit_on_sigterm, free_port_block
from loadtests.load.sse import StreamCheck
from loadtests.load.workload import WORDS
from replica.engines.profile import load_profile

PROG = "python -m loadtests.prefix_bench"
WORKLOADS = ("chat-prefix", "kv-pressure", "unique")
SHARED = ("chat-prefix", "kv-pressure")  # the workloads whose conversations share prompts
KV_DEMAND = 1.0  # kv-pressure: its system prompts' tokens over the fleet's KV tokens, at least
BASELINE = "least_outstanding_requests"
HASHES = ("own", "vllm")  # the block hashes in the replicas' KV cache events


# -- the workload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    question: str
    max_tokens: int
    think_s: float  # pause before this turn in the open loop (0 for the first)


@dataclass(frozen=True)
class Conversation:
    id: str
    arrival_s: float
    system: str
    turns: tuple[Turn, ...]


def text_of(rng: random.Random, length: int) -> str:
    words: list[str] = []
    size = 0
    while size < length:
        words.append(rng.choice(WORDS) + str(rng.randrange(100)))
        size += len(words[-1]) + 1
    return " ".join(words)[:length]


@cache
def replica_kv_tokens() -> int:
    """One replica's KV capacity in tokens: the simulated profile's (replica_yaml sets none)."""
    return load_profile().generation.kv_capacity_tokens


def kv_demand(systems: list[str], replicas: int) -> float:
    """The system prompts' tokens (the replicas' tokens are bytes) over the fleet's KV tokens."""
    return sum(len(s.encode()) for s in systems) / (replicas * replica_kv_tokens())


def system_prompts(workload: str, seed: int, replicas: int) -> list[str]:
    """chat-prefix: 8 of 500-2,000 tokens. kv-pressure: of 1,500-3,000 tokens, until together
    they fill KV_DEMAND x the fleet's KV."""
    rng = random.Random(f"{workload}:{seed}:systems")
    if workload != "kv-pressure":
        return [text_of(rng, rng.randint(500, 2000)) for _ in range(8)]
    systems: list[str] = []
    while kv_demand(systems, replicas) < KV_DEMAND:
        systems.append(text_of(rng, rng.randint(1500, 3000)))
    return systems


def conversation(
    workload: str, rng: random.Random, cid: str, arrival_s: float, systems: list[str],
    think_s: float,
) -> Conversation:  # fmt: skip
    if workload in SHARED:
        system, n = rng.choice(systems), rng.randint(3, 6)
    else:
        system, n = text_of(rng, rng.randint(500, 2000)), 1
    turns = tuple(
        Turn(
            f"{cid} question {k}: " + text_of(rng, rng.randint(20, 80) * 6),
            rng.randint(16, 64),
            0.0 if k == 0 else rng.expovariate(1 / think_s),
        )
        for k in range(n)
    )
    return Conversation(cid, arrival_s, system, turns)


def mean_turns(workload: str) -> float:
    return 4.5 if workload in SHARED else 1.0


def conversations(
    workload: str, seed: int, rate: float, seconds: float, think_s: float, replicas: int
) -> list[Conversation]:
    """Poisson arrivals over `seconds` such that about `rate` requests/s are offered."""
    rng = random.Random(f"{workload}:{seed}")
    systems = system_prompts(workload, seed, replicas)
    out: list[Conversation] = []
    t = rng.expovariate(rate / mean_turns(workload))
    while t < seconds:
        out.append(conversation(workload, rng, f"c{len(out)}", t, systems, think_s))
        t += rng.expovariate(rate / mean_turns(workload))
    return out


# -- driving it -----------------------------------------------------------------------------


@dataclass
class Sample:
    conversation: str
    turn: int
    sent_s: float  # from the start of the run
    ok: bool
    status: int
    latency_s: float
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    front: int = 0  # the front-end instance it was sent to


async def chat(
    client: aiohttp.ClientSession, url: str, conv: Conversation, messages: list[dict[str, str]],
    turn: Turn, index: int, sent_s: float,
) -> tuple[Sample, str]:  # fmt: skip
    body = {
        "model": "tiny-gpt", "messages": messages, "max_tokens": turn.max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    t0 = time.perf_counter()
    ttft, status, text = math.nan, 0, []
    usage: dict[str, Any] = {}
    check = StreamCheck()
    try:
        headers = {"X-Session-Id": conv.id}
        async with client.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            status = r.status
            async for line in r.content:
                if check.feed(line) and math.isnan(ttft):
                    ttft = time.perf_counter() - t0
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        text.append((choice.get("delta") or {}).get("content") or "")
                if check.done:
                    break
    except (aiohttp.ClientError, TimeoutError, ValueError):
        pass
    latency = time.perf_counter() - t0
    details = usage.get("prompt_tokens_details") or {}
    sample = Sample(
        conv.id, index, sent_s, check.ok and status == 200, status, latency, ttft,
        int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0),
        int(usage.get("completion_tokens", 0)),
    )  # fmt: skip
    return sample, "".join(text)


class Driver:
    """One run's client side: every request's sample, whatever the window (the report cuts).
    Each request goes to one of the front-end instances `urls`, drawn at random."""

    def __init__(self, urls: list[str], client: aiohttp.ClientSession, seed: int) -> None:
        self.urls, self.client = urls, client
        self.balancer = random.Random(f"balancer:{seed}")
        self.samples: list[Sample] = []
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def converse(self, conv: Conversation, stop_s: float, think: bool) -> bool:
        """The turns of one conversation, each after its think time (open loop) or at once
        (closed loop); no turn is sent after `stop_s`. False when a request failed."""
        messages = [{"role": "system", "content": conv.system}]
        for k, turn in enumerate(conv.turns):
            if think:
                await asyncio.sleep(turn.think_s)
            if self.now() >= stop_s:
                return True
            messages.append({"role": "user", "content": turn.question})
            front = self.balancer.randrange(len(self.urls))
            url = self.urls[front]
            sample, reply = await chat(self.client, url, conv, messages, turn, k, self.now())
            sample.front = front
            self.samples.append(sample)
            if not sample.ok:
                return False  # a broken conversation ends; its failure is counted
            messages.append({"role": "assistant", "content": reply})
        return True


def client_session() -> aiohttp.ClientSession:
    limit = aiohttp.ClientTimeout(total=300)
    return aiohttp.ClientSession(timeout=limit, connector=aiohttp.TCPConnector(limit=0))


async def drive_open(
    urls: list[str], convs: list[Conversation], window: tuple[float, float], seed: int
) -> list[Sample]:
    """Every conversation from its arrival. Conversations arriving after the window are not
    started; those under way run to their end, so the load stays on for the last measured
    request."""
    async with client_session() as client:
        driver = Driver(urls, client, seed)

        async def run(conv: Conversation) -> None:
            await asyncio.sleep(max(0.0, conv.arrival_s - driver.now()))
            await driver.converse(conv, math.inf, think=True)

        await asyncio.gather(*(run(c) for c in convs if c.arrival_s < window[1]))
    return driver.samples


async def drive_closed(
    urls: list[str], workload: str, seed: int, users: int, window: tuple[float, float],
    replicas: int,
) -> list[Sample]:  # fmt: skip
    """`users` users, each starting its next conversation when the last ends, until the window
    ends; a request under way then is waited for."""
    systems = system_prompts(workload, seed, replicas)
    async with client_session() as client:
        driver = Driver(urls, client, seed)

        async def user(index: int) -> None:
            rng = random.Random(f"{workload}:{seed}:user{index}")
            n = 0
            while driver.now() < window[1]:
                cid = f"u{index}c{n}"
                conv = conversation(workload, rng, cid, driver.now(), systems, 1.0)
                if not await driver.converse(conv, window[1], think=False):
                    await asyncio.sleep(0.5)  # a failing front end is not hammered
                n += 1

        await asyncio.gather(*(user(i) for i in range(users)))
    return driver.samples


# -- one run --------------------------------------------------------------------------------

MAX_NUM_SEQS = 4  # per replica, as replica_yaml configures the batcher
CLOSED = "closed"
Capacities = dict[tuple[str, int], float]  # (workload, seed): req/s, measured


def closed_users(replicas: int) -> int:
    return 2 * replicas * MAX_NUM_SEQS


@dataclass
class Run:
    workload: str
    load: str  # CLOSED, or the share of capacity offered ("0.7")
    front_end: str
    seed: int
    offered_rps: float  # NaN in the closed loop
    samples: list[Sample] = field(default_factory=list)
    replica_requests: list[float] = field(default_factory=list)
    instances: int = 1  # of the front end, the load spread at random over them
    kv_stored: float = math.nan  # KV blocks the replicas stored over the run, all together
    kv_evicted: float = math.nan  # ... and evicted (their KV cache events say)

    @property
    def label(self) -> str:
        return self.front_end if self.instances == 1 else f"{self.front_end} x{self.instances}"


async def replica_requests(urls: list[str]) -> list[float]:
    """Chat requests each replica answered, from its own metrics."""
    out = []
    async with aiohttp.ClientSession() as client:
        for url in urls:
            async with client.get(f"{url}/metrics") as response:
                text = await response.text()
            out.append(
                sum(
                    s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                    if s.name == "replica_requests_total"
                    and s.labels.get("endpoint") == "/v1/chat/completions"
                )
            )
    return out


def replica_yaml(workdir: Path, hashes: str) -> Path:
    config = {
        "engine": {"kind": "simulated"},  # the 7B/A10G profile: KV 16,000 tokens in 16s
        "models": [
            {
                "kind": "tiny-gpt",
                "params": {"context_len": 8192},
                "max_tokens_limit": 256,
                "batcher": {
                    "kind": "continuous", "max_num_seqs": MAX_NUM_SEQS, "max_batch_tokens": 2048,
                },
            }
        ],
        # the endpoints come per replica from --kv-events-config (gateway/cluster.py)
        "kv_events": {"hashes": hashes},
    }  # fmt: skip
    path = workdir / "replica.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def window_of(args: argparse.Namespace) -> tuple[float, float]:
    return (args.warmup_s, args.warmup_s + args.duration_s)


def one_run(
    args: argparse.Namespace, workload: str, load: str, name: str, instances: int, seed: int,
    rate: float, workdir: Path,
) -> Run:  # fmt: skip
    """Fresh replicas publishing KV cache events, `instances` instances of front end `name`
    before them, and one load; the replicas' request counts and KV events over the run."""
    fronts = free_port_block(PORTS_PER_INSTANCE * instances + 3 * args.replicas)
    first_replica = fronts + PORTS_PER_INSTANCE * instances
    cluster = ClusterConfig(
        replicas=args.replicas, engine="simulated",
        replica_config=replica_yaml(workdir, args.hashes), first_replica_port=first_replica,
        kv_events_port=first_replica + args.replicas,  # two ports per replica
    )  # fmt: skip
    fleet = Fleet(replica_urls(cluster), [kv_endpoints(cluster, i) for i in range(cluster.size)])
    window = window_of(args)
    convs = (
        conversations(workload, seed, rate, window[1], args.think_s, args.replicas)
        if load != CLOSED
        else []
    )
    with open(workdir / "processes.log", "ab") as log, replicas_running(cluster, log) as procs:
        asyncio.run(wait_ready(fleet.urls, procs))
        with (
            KvWatch([endpoint for endpoint, _ in fleet.kv_events]) as kv,
            front_ends(name, instances, fleet, fronts, seed, workdir, log) as urls,
        ):
            if load == CLOSED:
                users = closed_users(args.replicas)
                samples = asyncio.run(
                    drive_closed(urls, workload, seed, users, window, args.replicas)
                )
            else:
                samples = asyncio.run(drive_open(urls, convs, window, seed))
        served = asyncio.run(replica_requests(fleet.urls))
    offered = sum(1 for c in convs for _ in c.turns) / window[1] if convs else math.nan
    return Run(
        workload, load, name, seed, offered, samples, served, instances, sum(kv.stored),
        sum(kv.removed),
    )  # fmt: skip


def measured(run: Run, args: argparse.Namespace) -> list[Sample]:
    """The samples of the requests sent inside the window."""
    low, high = window_of(args)
    return [s for s in run.samples if low <= s.sent_s < high]


def completed(run: Run, args: argparse.Namespace) -> list[Sample]:
    """The requests that completed inside the window, whenever sent."""
    low, high = window_of(args)
    return [s for s in run.samples if s.ok and low <= s.sent_s + s.latency_s < high]


def capacity(run: Run, args: argparse.Namespace) -> float:
    """Requests/s completed inside the window: the closed loop's throughput."""
    return len(completed(run, args)) / float(args.duration_s)


# -- the report -----------------------------------------------------------------------------


def ttft_blocks(runs: list[Run], args: argparse.Namespace) -> list[stats.Block]:
    """TTFT of the requests sent in the window, in blocks by when they were sent."""
    out: list[stats.Block] = []
    for run in runs:
        ok = [s for s in measured(run, args) if s.ok]
        values = [s.ttft_s for s in ok]
        out += stats.blocks_of([s.sent_s for s in ok], values, args.warmup_s, args.duration_s, 4)
    return out


def completion_blocks(runs: list[Run], args: argparse.Namespace) -> list[stats.Block]:
    """The completions inside the window, in blocks by when they ended."""
    out: list[stats.Block] = []
    for run in runs:
        done = completed(run, args)
        ends = [s.sent_s + s.latency_s for s in done]
        out += stats.blocks_of(ends, [s.latency_s for s in done], args.warmup_s, args.duration_s, 4)
    return out


def loads_of(args: argparse.Namespace) -> list[str]:
    return list(args.loads)


def section_title(workload: str, load: str, instances: int, args: argparse.Namespace) -> str:
    if load == CLOSED:
        title = f"{workload}, closed loop ({closed_users(args.replicas)} users)"
    else:
        title = f"{workload}, open loop at {float(load):.0%} of capacity"
    return title if instances == 1 else f"{title}, {instances} front-end instances"


def levels(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """Each table of the report: (workload, load, front-end instances)."""
    return [(w, load, n) for w in args.workloads for load in loads_of(args) for n in args.instances]


def summary_rows(
    runs: list[Run], capacities: Capacities, args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = []
    for level in levels(args):
        here = [r for r in runs if (r.workload, r.load, r.instances) == level]
        base = [r for r in here if r.front_end == BASELINE]
        for name in args.front_ends:
            mine = [r for r in here if r.front_end == name]
            if mine:
                rows.append(row_of(level, name, mine, base, capacities, args))
    return rows


def p90(blocks: Sequence[stats.Block]) -> float:
    return stats.percentile(np.concatenate([b.latencies_s for b in blocks]), 90)


def row_of(
    level: tuple[str, str, int], name: str, mine: list[Run], base: list[Run],
    capacities: Capacities, args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    workload, load, instances = level
    sent = [s for r in mine for s in measured(r, args)]
    ok = [s for s in sent if s.ok]
    ttft = ttft_blocks(mine, args)
    compare = bool(base) and name != BASELINE
    done = completion_blocks(mine, args)
    prompt = sum(s.prompt_tokens for s in ok)
    spread = [max(r.replica_requests) / np.mean(r.replica_requests) for r in mine]
    return {
        "workload": workload,
        "load": load,
        "instances": instances,
        "front_end": name,
        "label": mine[0].label,
        "capacity_rps": np.mean([capacities[(workload, r.seed)] for r in mine]),
        "offered_rps": np.mean([r.offered_rps for r in mine]),
        "requests": len(sent),
        "sent_rps": len(sent) / (len(mine) * float(args.duration_s)),
        "errors": len(sent) - len(ok),
        "ttft_p50_s": stats.percentile([s.ttft_s for s in ok], 50),
        "ttft_p90": stats.interval(ttft, p90) if ok else None,
        "ttft_p99": stats.interval(ttft, stats.p99) if ok else None,
        "ttft_p99_vs_lor": (
            stats.relative_change(ttft, ttft_blocks(base, args), stats.p99)
            if compare and ok
            else None
        ),
        "e2e_p99_s": stats.percentile([s.latency_s for s in ok], 99),
        "per_min_per_instance": stats.interval(done, lambda b: stats.per_minute(b) / instances),
        "throughput_vs_lor": (
            stats.relative_change(done, completion_blocks(base, args), stats.per_minute)
            if compare
            else None
        ),
        "cache_hit": sum(s.cached_tokens for s in ok) / prompt if prompt else math.nan,
        "kv_stored": np.mean([r.kv_stored for r in mine]),
        "kv_evicted": np.mean([r.kv_evicted for r in mine]),
        "spread": max(spread),
    }


def interval_text(i: stats.Interval | None, scale: float = 1.0, pct: bool = False) -> str:
    if i is None:
        return "-"
    if pct:
        mark = "" if i.excludes_zero else " (n.s.)"
        return f"{i.estimate:+.1%} [{i.low:+.1%}, {i.high:+.1%}]{mark}"
    digits = 1 if i.estimate * scale >= 10 else 2
    return (
        f"{i.estimate * scale:.{digits}f} [{i.low * scale:.{digits}f}, {i.high * scale:.{digits}f}]"
    )


COLUMNS = (
    "Front end", "Requests", "Sent (req/s)", "Errors", "TTFT P50 (s)", "TTFT P90 (s) [95% CI]",
    "TTFT P99 (s) [95% CI]", "TTFT P99 vs least_outstanding_requests [95% CI]", "E2E P99 (s)",
    "req/min/front-end instance [95% CI]",
    "Throughput vs least_outstanding_requests [95% CI]", "Cache hit rate",
    "KV blocks evicted / stored (per run)", "Load spread (max/mean)",
)  # fmt: skip


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Simulated engine (7B/A10G profile, KV {replica_kv_tokens():,} tokens, {MAX_NUM_SEQS} "
        f"sequences per replica), {args.replicas} replicas, prefix cache on"
        f"{events_text(rows, args)}. "
        "Each front end runs as the section's number of instances, each request sent to one "
        "at random; req/min/front-end instance is the fleet's completions per minute over that "
        f"number. Closed loop: {closed_users(args.replicas)} users (two per sequence slot), no "
        "think time; the throughput of one least_outstanding_requests instance there is the "
        "measured capacity of each workload and seed. Open loop: Poisson arrivals of "
        "conversations at the stated share of that capacity, think time "
        f"{args.think_s:g} s between turns. {args.seeds} seeds x {args.duration_s:g} s measured "
        f"after {args.warmup_s:g} s warm-up; latencies and cache hits of the requests sent in "
        "the window, throughput of those completed in it. "
        f"Command: `{command_of(args)}`",
        "",
    ]
    for level in levels(args):
        mine = [r for r in rows if (r["workload"], r["load"], r["instances"]) == level]
        if mine:
            lines += section_lines(level, mine, args)
    return "\n".join(lines)


def events_text(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    if not any(math.isfinite(r["kv_stored"]) for r in rows):
        return ""  # a folder from before the replicas published events
    hashes = "vLLM-like" if args.hashes == "vllm" else "their own"
    return f", publishing KV cache events ({hashes} block hashes)"


def section_lines(
    level: tuple[str, str, int], rows: list[dict[str, Any]], args: argparse.Namespace
) -> list[str]:
    workload, load, instances = level
    offered = (
        f"offered {rows[0]['offered_rps']:.2f} req/s (every turn of the conversations that "
        "arrived, over warm-up + window; Sent is what the window saw); "
        if load != CLOSED
        else ""
    )
    lines = [
        f"### {section_title(workload, load, instances, args)}", "",
        f"{offered}measured capacity {rows[0]['capacity_rps']:.2f} req/s "
        "(least_outstanding_requests, one instance, closed loop, mean over seeds)."
        + pressure_text(workload, args), "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
    ]  # fmt: skip
    for row in rows:
        kv = (
            f"{row['kv_evicted']:,.0f} / {row['kv_stored']:,.0f}"
            if math.isfinite(row["kv_stored"])
            else "-"
        )
        lines.append(
            f"| {row['front_end']} | {row['requests']} | {row['sent_rps']:.2f} | "
            f"{row['errors']} | {row['ttft_p50_s']:.3f} | {interval_text(row['ttft_p90'])} | "
            f"{interval_text(row['ttft_p99'])} | "
            f"{interval_text(row['ttft_p99_vs_lor'], pct=True)} | "
            f"{row['e2e_p99_s']:.2f} | {interval_text(row['per_min_per_instance'])} | "
            f"{interval_text(row['throughput_vs_lor'], pct=True)} | "
            f"{row['cache_hit']:.1%} | {kv} | {row['spread']:.2f} |"
        )
    return [*lines, ""]


def pressure_text(workload: str, args: argparse.Namespace) -> str:
    """How far the workload's shared prompts fill the fleet's KV (kv-pressure only)."""
    if workload != "kv-pressure":
        return ""
    systems = [system_prompts(workload, seed, args.replicas) for seed in range(args.seeds)]
    demand = np.mean([kv_demand(s, args.replicas) for s in systems])
    count = np.mean([len(s) for s in systems])
    return (
        f" KV demand of its {count:.0f} distinct system prompts (1,500-3,000 tokens, mean over "
        f"seeds): {demand:.2f}x the fleet's KV ({args.replicas} replicas x "
        f"{replica_kv_tokens():,} tokens)."
    )


def chart(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> Path:
    """Per load: TTFT P99 (with its interval) per front end and instance count, one bar per
    workload; and the cache hit rate of the first load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = loads_of(args)
    fig, axes = plt.subplots(1, len(loads) + 1, figsize=(5.5 * (len(loads) + 1), 4.6), dpi=110)
    width = 0.8 / len(args.workloads)
    names = list(dict.fromkeys(r["label"] for r in rows))
    for panel, load in enumerate(loads):
        for k, workload in enumerate(args.workloads):
            mine = {r["label"]: r for r in rows if (r["workload"], r["load"]) == (workload, load)}
            xs = [i + k * width for i, n in enumerate(names) if n in mine]
            p99 = [mine[n]["ttft_p99"] for n in names if n in mine]
            estimate = [i.estimate if i else math.nan for i in p99]
            error = [
                [e - i.low if i else 0 for e, i in zip(estimate, p99, strict=True)],
                [i.high - e if i else 0 for e, i in zip(estimate, p99, strict=True)],
            ]
            axes[panel].bar(xs, estimate, width, yerr=error, capsize=2, label=workload)
            if panel == 0:
                hits = [mine[n]["cache_hit"] for n in names if n in mine]
                axes[-1].bar(xs, hits, width, label=workload)
        axes[panel].set_title(
            "closed loop" if load == CLOSED else f"open loop, {float(load):.0%} of capacity"
        )
        axes[panel].set_ylabel("TTFT P99 (s), 95% CI")
    axes[-1].set_title("closed loop" if loads[0] == CLOSED else f"{float(loads[0]):.0%}")
    axes[-1].set_ylabel("fleet cache hit rate")
    for ax in axes:
        ax.set_xticks([i + width * (len(args.workloads) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "ttft_p99_and_cache_hits.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_file(run: Run) -> str:
    front = run.front_end.replace(":", "_") + ("" if run.instances == 1 else f"-x{run.instances}")
    return f"{run.workload}-{run.load}-{front}-seed{run.seed}.csv.gz"


def read(folder: Path) -> tuple[argparse.Namespace, list[Run], Capacities]:
    """A result folder's command, runs and capacities, from its runs.csv and raw samples."""
    command = (folder / "command.txt").read_text().strip()
    args = recorded_args(command, PROG, parser())
    runs, capacities = [], {}
    with open(folder / "runs.csv", newline="") as f:
        for row in csv.DictReader(f):
            run = Run(
                row["workload"], row["load"], row["front_end"], int(row["seed"]),
                float(row["offered_rps"]), [],
                [float(x) for x in row["replica_requests"].split()],
                # folders from before instances and KV events have no such columns
                int(row.get("instances", 1)), float(row.get("kv_stored_blocks", math.nan)),
                float(row.get("kv_evicted_blocks", math.nan)),
            )  # fmt: skip
            with gzip.open(folder / "samples" / sample_file(run), "rt", newline="") as g:
                run.samples = [_sample(r) for r in csv.DictReader(g)]
            capacities[(run.workload, run.seed)] = float(row["capacity_rps"])
            runs.append(run)
    return args, runs, capacities


def _sample(row: dict[str, str]) -> Sample:
    kinds = {f.name: f.type for f in fields(Sample)}

    def value(name: str, text: str) -> Any:
        kind = kinds[name]
        if kind == "bool":
            return text == "True"
        return int(text) if kind == "int" else float(text) if kind == "float" else text

    return Sample(**{k: value(k, v) for k, v in row.items()})


def render(folder: Path, args: argparse.Namespace, runs: list[Run], capacities: Capacities) -> str:
    rows = summary_rows(runs, capacities, args)
    text = table(rows, args)
    (folder / "table.md").write_text(text)
    chart(rows, args, folder)
    return text


def write(runs: list[Run], capacities: Capacities, args: argparse.Namespace) -> str:
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for run in runs:
        with gzip.open(out / "samples" / sample_file(run), "wt", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([fl.name for fl in fields(Sample)])
            writer.writerows([list(asdict(s).values()) for s in run.samples])
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["workload", "load", "front_end", "seed", "capacity_rps", "offered_rps",
                         "requests", "replica_requests", "instances", "kv_stored_blocks",
                         "kv_evicted_blocks"])  # fmt: skip
        for r in runs:
            served = " ".join(f"{x:.0f}" for x in r.replica_requests)
            writer.writerow([r.workload, r.load, r.front_end, r.seed,
                             f"{capacities[(r.workload, r.seed)]:.3f}", f"{r.offered_rps:.3f}",
                             len(r.samples), served, r.instances, f"{r.kv_stored:.0f}",
                             f"{r.kv_evicted:.0f}"])  # fmt: skip
    (out / "command.txt").write_text(command_of(args) + "\n")
    return render(out, args, runs, capacities)


# -- the command line -----------------------------------------------------------------------


def csv_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def load_list(text: str) -> list[str]:
    """`closed` or shares of capacity in (0, 2], as written (`0.7`)."""
    loads = csv_list(text)
    for load in loads:
        try:
            ok = load == CLOSED or 0 < float(load) <= 2
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(
                f"load {load!r}: use {CLOSED!r} or a share of capacity in (0, 2], e.g. 0.7"
            )
    return loads


def instance_list(text: str) -> list[int]:
    """Front-end instance counts, each 1 to 16."""
    try:
        counts = [int(x) for x in csv_list(text)]
    except ValueError:
        counts = []
    if not counts or not all(1 <= n <= 16 for n in counts):
        raise argparse.ArgumentTypeError(f"instances {text!r}: counts from 1 to 16, e.g. 1,3")
    return counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--replicas", type=int, default=5)
    p.add_argument(
        "--loads", type=load_list, default=[CLOSED, "0.7"],
        help=f"{CLOSED!r} (closed loop, two users per slot) and/or open-loop shares of the "
        "capacity least_outstanding_requests reaches in the closed loop",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--think-s", type=float, default=2.0, help="mean think time between turns")
    p.add_argument("--workloads", type=csv_list, default=list(WORKLOADS))
    p.add_argument("--front-ends", type=csv_list, default=[*OURS, *PEERS])
    p.add_argument(
        "--instances", type=instance_list, default=[1],
        help="run each front end as this many instances (each count in turn), requests spread "
        "at random over them",
    )  # fmt: skip
    p.add_argument(
        "--hashes", choices=HASHES, default="own",
        help="block hashes in the replicas' KV cache events: their own, or vLLM-like (32 "
        "bytes from a random root per process, which no router can reproduce)",
    )  # fmt: skip
    p.add_argument("--out", default="loadtests/results/prefix-routing")
    p.add_argument(
        "--render", type=Path, help="only rewrite this folder's table.md from its samples"
    )
    return p


def command_of(args: argparse.Namespace) -> str:
    """Every option spelled out, but for those newer than a committed folder at their default
    (one instance, own hashes), so its command still reads as recorded."""
    newer = "" if args.instances == [1] else f" --instances {','.join(map(str, args.instances))}"
    newer += "" if args.hashes == "own" else f" --hashes {args.hashes}"
    return (
        f"{PROG} --replicas {args.replicas} --loads {','.join(args.loads)} --seeds {args.seeds} "
        f"--warmup-s {args.warmup_s:g} --duration-s {args.duration_s:g} --think-s "
        f"{args.think_s:g} --workloads {','.join(args.workloads)} --front-ends "
        f"{','.join(args.front_ends)}{newer} --out {args.out}"
    )


def report(run: Run, args: argparse.Namespace) -> None:
    sent = measured(run, args)
    ok = [s for s in sent if s.ok]
    hit = sum(s.cached_tokens for s in ok) / max(1, sum(s.prompt_tokens for s in ok))
    ttft = [s.ttft_s for s in ok]
    print(
        f"  {run.workload:<11} {run.load:<6} {run.label:<29} seed {run.seed}: "
        f"{len(ok)}/{len(sent)} ok, {capacity(run, args):.2f} req/s completed, TTFT P90/P99 "
        f"{stats.percentile(ttft, 90):.3f}/{stats.percentile(ttft, 99):.3f} s, cache "
        f"{hit:.0%}, KV blocks evicted/stored {run.kv_evicted:.0f}/{run.kv_stored:.0f}, "
        f"replicas {run.replica_requests}",
        flush=True,
    )


def runs_at(
    args: argparse.Namespace, workload: str, seed: int, saturation: Run, workdir: Path
) -> list[Run]:
    """Every load, instance count and front end of one workload and seed, after its capacity
    run (which is the closed loop's one least_outstanding_requests)."""
    runs = []
    for load in args.loads:
        rate = math.nan if load == CLOSED else float(load) * capacity(saturation, args)
        for instances in args.instances:
            for name in args.front_ends:
                if (load, name, instances) == (CLOSED, BASELINE, 1):
                    runs.append(saturation)
                    continue
                run = one_run(args, workload, load, name, instances, seed, rate, workdir)
                report(run, args)
                runs.append(run)
    return runs


def main() -> None:
    args = parser().parse_args()
    if args.render:
        print(render(args.render, *read(args.render)))
        return
    unknown = [n for n in args.front_ends if n not in OURS and n not in PEERS]
    if unknown or any(w not in WORKLOADS for w in args.workloads):
        parser().error(f"unknown front ends or workloads: {unknown or args.workloads}")
    args.front_ends = available(args.front_ends)
    exit_on_sigterm()
    workdir = Path(args.out) / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    runs: list[Run] = []
    capacities: Capacities = {}
    for workload in args.workloads:
        for seed in range(args.seeds):
            # the capacity run first: one least_outstanding_requests in the closed loop
            saturation = one_run(args, workload, CLOSED, BASELINE, 1, seed, math.nan, workdir)
            report(saturation, args)
            capacities[(workload, seed)] = capacity(saturation, args)
            runs += runs_at(args, workload, seed, saturation, workdir)
    print(write(runs, capacities, args))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
