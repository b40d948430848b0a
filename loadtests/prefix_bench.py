"""Prefix-aware routing benchmark: multi-turn chats over shared system prompts, and a
unique-prompt control, through every front end in front of the same simulated replicas (prefix
cache on), in one run.

    python -m loadtests.prefix_bench [--replicas 5] [--loads closed,0.7] [--seeds 2]
        [--warmup-s 10] [--duration-s 30] [--workloads chat-prefix,unique] [--front-ends ...]
        [--out DIR]

Workloads (seeded; every front end sees the same conversations):
- `chat-prefix`: 8 system prompts of 500-2,000 tokens; each conversation picks one, then sends
  3-6 turns (a 20-80 word question each, the whole history re-sent every turn, the reply
  appended as generated).
- `unique`: single requests with a prompt of the same length range that shares nothing.

Loads, per workload and seed:
- `closed`: closed loop, two users per sequence slot of the fleet (so no slot idles), each
  running conversations back to back with no think time. `least_outstanding_requests` runs it
  first: the requests/s it completes in the window is the fleet's measured capacity for that
  workload and seed.
- a share such as `0.7`: open loop, new conversations arriving as a Poisson process so that this
  share of that measured capacity is offered, with exponential think time between turns.

Front ends: our gateway with `random`, `least_outstanding_requests`, `affinity`, `prefix_aware`,
`precise_prefix`; and, when installed (`pip install -e '.[peers]'`), `sglang-router` with
`cache_aware` and `power_of_two` and `vllm-router` with `cache_aware` and `consistent_hash`,
at their defaults; a missing one is skipped with a notice. Every run starts fresh replicas, so
no front end inherits another's caches. Requests are streamed OpenAI chat completions with
`X-Session-Id: <conversation>` and `stream_options.include_usage`, so each sample carries the
prompt tokens and the cached tokens the replica reports.

Measured, from raw samples: of the requests sent inside the window (each waited for with the
load kept on), TTFT P50/P99, end-to-end P99, the fleet's cache hit rate (cached / prompt tokens);
completions that ended inside the window per minute per instance; the load spread (each
replica's share of the chat requests, from its own metrics; max over mean). Intervals: 95% block
bootstrap over the pooled seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gzip
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import aiohttp
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.cluster import ClusterConfig, replica_urls, replicas_running, wait_ready
from loadtests.analysis import stats
from loadtests.harness.plan import recorded_args
from loadtests.harness.runner import (
    exit_on_sigterm,
    free_port_block,
    front_end_process,
    gateway_process,
)
from loadtests.load.sse import StreamCheck
from loadtests.load.workload import WORDS

PROG = "python -m loadtests.prefix_bench"
OURS = ("random", "least_outstanding_requests", "affinity", "prefix_aware", "precise_prefix")
PEERS = {  # name: (console script, its arguments before the common ones, policy)
    "sglang:cache_aware": ("sglang-router", ["launch"], "cache_aware"),
    "sglang:power_of_two": ("sglang-router", ["launch"], "power_of_two"),
    "vllm:cache_aware": ("vllm-router", [], "cache_aware"),
    "vllm:consistent_hash": ("vllm-router", [], "consistent_hash"),
}
WORKLOADS = ("chat-prefix", "unique")
BASELINE = "least_outstanding_requests"


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


def system_prompts(workload: str, seed: int) -> list[str]:
    rng = random.Random(f"{workload}:{seed}:systems")
    return [text_of(rng, rng.randint(500, 2000)) for _ in range(8)]


def conversation(
    workload: str, rng: random.Random, cid: str, arrival_s: float, systems: list[str],
    think_s: float,
) -> Conversation:  # fmt: skip
    if workload == "chat-prefix":
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
    return 4.5 if workload == "chat-prefix" else 1.0


def conversations(
    workload: str, seed: int, rate: float, seconds: float, think_s: float
) -> list[Conversation]:
    """Poisson arrivals over `seconds` such that about `rate` requests/s are offered."""
    rng = random.Random(f"{workload}:{seed}")
    systems = system_prompts(workload, seed)
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
    """One run's client side: every request's sample, whatever the window (the report cuts)."""

    def __init__(self, url: str, client: aiohttp.ClientSession) -> None:
        self.url, self.client = url, client
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
            sample, reply = await chat(self.client, self.url, conv, messages, turn, k, self.now())
            self.samples.append(sample)
            if not sample.ok:
                return False  # a broken conversation ends; its failure is counted
            messages.append({"role": "assistant", "content": reply})
        return True


def client_session() -> aiohttp.ClientSession:
    limit = aiohttp.ClientTimeout(total=300)
    return aiohttp.ClientSession(timeout=limit, connector=aiohttp.TCPConnector(limit=0))


async def drive_open(
    url: str, convs: list[Conversation], window: tuple[float, float]
) -> list[Sample]:
    """Every conversation from its arrival. Conversations arriving after the window are not
    started; those under way run to their end, so the load stays on for the last measured
    request."""
    async with client_session() as client:
        driver = Driver(url, client)

        async def run(conv: Conversation) -> None:
            await asyncio.sleep(max(0.0, conv.arrival_s - driver.now()))
            await driver.converse(conv, math.inf, think=True)

        await asyncio.gather(*(run(c) for c in convs if c.arrival_s < window[1]))
    return driver.samples


async def drive_closed(
    url: str, workload: str, seed: int, users: int, window: tuple[float, float]
) -> list[Sample]:
    """`users` users, each starting its next conversation when the last ends, until the window
    ends; a request under way then is waited for."""
    systems = system_prompts(workload, seed)
    async with client_session() as client:
        driver = Driver(url, client)

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


# -- front ends -----------------------------------------------------------------------------


def peer_command(name: str) -> list[str] | None:
    script, prefix, _ = PEERS[name]
    path = shutil.which(script) or shutil.which(script, path=str(Path(sys.executable).parent))
    return [path, *prefix] if path else None


@contextlib.contextmanager
def front_end(
    name: str, urls: list[str], port: int, seed: int, workdir: Path, log: IO[bytes]
) -> Iterator[str]:
    if name in OURS:
        extra = {"routing": {"strategy": name, "seed": seed}}
        with gateway_process(urls, name, seed, port, workdir, log, extra) as (url, _):
            yield url
        return
    command = peer_command(name)
    assert command is not None, name
    policy = PEERS[name][2]
    cmd = [
        *command, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
        "--policy", policy, "--prometheus-port", str(port + 1), "--log-level",
        "warn" if name.startswith("sglang") else "warning",
    ]  # fmt: skip
    if name.startswith("sglang"):
        cmd += ["--prometheus-host", "127.0.0.1"]
    with front_end_process(cmd, port, "/readiness", log) as (url, _):
        yield url


def available(names: list[str]) -> list[str]:
    kept = []
    for name in names:
        if name in OURS or peer_command(name) is not None:
            kept.append(name)
        else:
            print(
                f"  skipped {name}: {PEERS[name][0]} is not installed (pip install -e '.[peers]')"
            )
    return kept


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


def replica_yaml(workdir: Path) -> Path:
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
    }  # fmt: skip
    path = workdir / "replica.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def window_of(args: argparse.Namespace) -> tuple[float, float]:
    return (args.warmup_s, args.warmup_s + args.duration_s)


def one_run(
    args: argparse.Namespace, workload: str, load: str, name: str, seed: int, rate: float,
    workdir: Path,
) -> Run:  # fmt: skip
    port = free_port_block(args.replicas + 2)
    cluster = ClusterConfig(
        replicas=args.replicas, engine="simulated", replica_config=replica_yaml(workdir),
        first_replica_port=port + 2, kv_events_port=None,
    )  # fmt: skip
    urls = replica_urls(cluster)
    window = window_of(args)
    convs = conversations(workload, seed, rate, window[1], args.think_s) if load != CLOSED else []
    with open(workdir / "processes.log", "ab") as log, replicas_running(cluster, log) as procs:
        asyncio.run(wait_ready(urls, procs))
        with front_end(name, urls, port, seed, workdir, log) as url:
            if load == CLOSED:
                users = closed_users(args.replicas)
                samples = asyncio.run(drive_closed(url, workload, seed, users, window))
            else:
                samples = asyncio.run(drive_open(url, convs, window))
        served = asyncio.run(replica_requests(urls))
    offered = sum(1 for c in convs for _ in c.turns) / window[1] if convs else math.nan
    return Run(workload, load, name, seed, offered, samples, served)


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


def section_title(workload: str, load: str, args: argparse.Namespace) -> str:
    if load == CLOSED:
        return f"{workload}, closed loop ({closed_users(args.replicas)} users)"
    return f"{workload}, open loop at {float(load):.0%} of capacity"


def summary_rows(
    runs: list[Run], capacities: Capacities, args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = []
    for workload in args.workloads:
        for load in loads_of(args):
            here = [r for r in runs if (r.workload, r.load) == (workload, load)]
            base = [r for r in here if r.front_end == BASELINE]
            for name in args.front_ends:
                mine = [r for r in here if r.front_end == name]
                if mine:
                    rows.append(row_of(workload, load, name, mine, base, capacities, args))
    return rows


def row_of(
    workload: str, load: str, name: str, mine: list[Run], base: list[Run],
    capacities: Capacities, args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
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
        "front_end": name,
        "capacity_rps": np.mean([capacities[(workload, r.seed)] for r in mine]),
        "offered_rps": np.mean([r.offered_rps for r in mine]),
        "requests": len(sent),
        "sent_rps": len(sent) / (len(mine) * float(args.duration_s)),
        "errors": len(sent) - len(ok),
        "ttft_p50_s": stats.percentile([s.ttft_s for s in ok], 50),
        "ttft_p99": stats.interval(ttft, stats.p99) if ok else None,
        "ttft_p99_vs_lor": (
            stats.relative_change(ttft, ttft_blocks(base, args), stats.p99)
            if compare and ok
            else None
        ),
        "e2e_p99_s": stats.percentile([s.latency_s for s in ok], 99),
        "per_min_per_instance": stats.interval(done, lambda b: stats.per_minute(b) / args.replicas),
        "throughput_vs_lor": (
            stats.relative_change(done, completion_blocks(base, args), stats.per_minute)
            if compare
            else None
        ),
        "cache_hit": sum(s.cached_tokens for s in ok) / prompt if prompt else math.nan,
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


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Simulated engine (7B/A10G profile, KV 16,000 tokens, {MAX_NUM_SEQS} sequences per "
        f"replica), {args.replicas} replicas, prefix cache on. Closed loop: "
        f"{closed_users(args.replicas)} users (two per sequence slot), no think time; its "
        "least_outstanding_requests throughput is the measured capacity of each workload and "
        "seed. Open loop: Poisson arrivals of conversations at the stated share of that "
        f"capacity, think time {args.think_s:g} s between turns. {args.seeds} seeds x "
        f"{args.duration_s:g} s measured after {args.warmup_s:g} s warm-up; latencies and cache "
        "hits of the requests sent in the window, throughput of those completed in it. "
        f"Command: `{command_of(args)}`",
        "",
    ]
    for workload in args.workloads:
        for load in loads_of(args):
            mine = [r for r in rows if (r["workload"], r["load"]) == (workload, load)]
            if not mine:
                continue
            capacity_rps = mine[0]["capacity_rps"]
            offered = (
                f"offered {mine[0]['offered_rps']:.2f} req/s (every turn of the conversations "
                "that arrived, over warm-up + window; Sent is what the window saw); "
                if load != CLOSED
                else ""
            )
            lines += [
                f"### {section_title(workload, load, args)}", "",
                f"{offered}measured capacity {capacity_rps:.2f} req/s "
                "(least_outstanding_requests, closed loop, mean over seeds).", "",
                "| Front end | Requests | Sent (req/s) | Errors | TTFT P50 (s) "
                "| TTFT P99 (s) [95% CI] "
                "| TTFT P99 vs least_outstanding_requests [95% CI] | E2E P99 (s) | "
                "req/min/instance [95% CI] | Throughput vs least_outstanding_requests [95% CI] "
                "| Cache hit rate | Load spread (max/mean) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]  # fmt: skip
            for row in mine:
                lines.append(
                    f"| {row['front_end']} | {row['requests']} | {row['sent_rps']:.2f} | "
                    f"{row['errors']} | "
                    f"{row['ttft_p50_s']:.3f} | {interval_text(row['ttft_p99'])} | "
                    f"{interval_text(row['ttft_p99_vs_lor'], pct=True)} | "
                    f"{row['e2e_p99_s']:.2f} | {interval_text(row['per_min_per_instance'])} | "
                    f"{interval_text(row['throughput_vs_lor'], pct=True)} | "
                    f"{row['cache_hit']:.1%} | {row['spread']:.2f} |"
                )
            lines.append("")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> Path:
    """Per load: TTFT P99 (with its interval) per front end, one bar per workload; and the
    cache hit rate of the first load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = loads_of(args)
    fig, axes = plt.subplots(1, len(loads) + 1, figsize=(5.5 * (len(loads) + 1), 4.6), dpi=110)
    width = 0.8 / len(args.workloads)
    names = list(dict.fromkeys(r["front_end"] for r in rows))
    for panel, load in enumerate(loads):
        for k, workload in enumerate(args.workloads):
            mine = {
                r["front_end"]: r for r in rows if (r["workload"], r["load"]) == (workload, load)
            }
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
    return f"{run.workload}-{run.load}-{run.front_end.replace(':', '_')}-seed{run.seed}.csv.gz"


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
                         "requests", "replica_requests"])  # fmt: skip
        for r in runs:
            served = " ".join(f"{x:.0f}" for x in r.replica_requests)
            writer.writerow([r.workload, r.load, r.front_end, r.seed,
                             f"{capacities[(r.workload, r.seed)]:.3f}", f"{r.offered_rps:.3f}",
                             len(r.samples), served])  # fmt: skip
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
    p.add_argument("--out", default="loadtests/results/prefix-routing")
    p.add_argument(
        "--render", type=Path, help="only rewrite this folder's table.md from its samples"
    )
    return p


def command_of(args: argparse.Namespace) -> str:
    return (
        f"{PROG} --replicas {args.replicas} --loads {','.join(args.loads)} --seeds {args.seeds} "
        f"--warmup-s {args.warmup_s:g} --duration-s {args.duration_s:g} --think-s "
        f"{args.think_s:g} --workloads {','.join(args.workloads)} --front-ends "
        f"{','.join(args.front_ends)} --out {args.out}"
    )


def report(run: Run, args: argparse.Namespace) -> None:
    sent = measured(run, args)
    ok = [s for s in sent if s.ok]
    hit = sum(s.cached_tokens for s in ok) / max(1, sum(s.prompt_tokens for s in ok))
    print(
        f"  {run.workload:<11} {run.load:<6} {run.front_end:<26} seed {run.seed}: "
        f"{len(ok)}/{len(sent)} ok, {capacity(run, args):.2f} req/s completed, TTFT P99 "
        f"{stats.percentile([s.ttft_s for s in ok], 99):.3f} s, cache {hit:.0%}, replicas "
        f"{run.replica_requests}",
        flush=True,
    )


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
            # the capacity run first: least_outstanding_requests in the closed loop
            saturation = one_run(args, workload, CLOSED, BASELINE, seed, math.nan, workdir)
            report(saturation, args)
            capacities[(workload, seed)] = capacity(saturation, args)
            for load in args.loads:
                for name in args.front_ends:
                    if (load, name) == (CLOSED, BASELINE):
                        run = saturation
                    else:
                        rate = (
                            math.nan if load == CLOSED else float(load) * capacity(saturation, args)
                        )
                        run = one_run(args, workload, load, name, seed, rate, workdir)
                        report(run, args)
                    runs.append(run)
    print(write(runs, capacities, args))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
