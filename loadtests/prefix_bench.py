"""Prefix-aware routing benchmark: multi-turn chats over shared system prompts, and a
unique-prompt control, through every front end in front of the same simulated replicas (prefix
cache on), in one run.

    python -m loadtests.prefix_bench [--replicas 5] [--rate 6] [--seeds 2] [--warmup-s 10]
        [--duration-s 40] [--workloads chat-prefix,unique] [--front-ends ...] [--out DIR]

Workloads (seeded; every front end sees the same arrivals):
- `chat-prefix`: 8 system prompts of 500-2,000 tokens; conversations arrive as a Poisson process,
  each picks a system prompt, then sends 3-6 turns (a 20-80 word question each, the whole history
  re-sent every turn, the reply appended as generated) with exponential think time between turns.
- `unique`: single requests with a prompt of the same length range that shares nothing.

Front ends: our gateway with `random`, `least_outstanding_requests`, `affinity`, `prefix_aware`,
`precise_prefix`; and, when installed (`pip install -e '.[peers]'`), `sglang-router` with
`cache_aware` and `power_of_two` and `vllm-router` with `cache_aware` and `consistent_hash`,
at their defaults; a missing one is skipped with a notice. Every run starts fresh replicas, so
no front end inherits another's caches. Requests are streamed OpenAI chat completions with
`X-Session-Id: <conversation>` and `stream_options.include_usage`, so each sample carries the
prompt tokens and the cached tokens the replica reports.

Measured, from raw samples of the requests sent inside the window (each waited for with the load
kept on): TTFT P50/P99, end-to-end P99, completions per minute per instance, the fleet's cache
hit rate (cached / prompt tokens), and the load spread (each replica's share of the chat requests,
from its own metrics; max over mean). Intervals: 95% block bootstrap over the pooled seeds.
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
from loadtests import stats
from loadtests.plan import recorded_args
from loadtests.runner import (
    exit_on_sigterm,
    free_port_block,
    front_end_process,
    gateway_process,
)
from loadtests.sse import StreamCheck
from loadtests.workload import WORDS

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
    think_s: float  # pause before this turn (0 for the first)


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


def conversations(
    workload: str, seed: int, rate: float, seconds: float, think_s: float
) -> list[Conversation]:
    """Arrivals over `seconds` such that about `rate` requests/s are offered."""
    rng = random.Random(f"{workload}:{seed}")
    systems = [text_of(rng, rng.randint(500, 2000)) for _ in range(8)]
    mean_turns = 4.5 if workload == "chat-prefix" else 1.0
    out: list[Conversation] = []
    t = rng.expovariate(rate / mean_turns)
    while t < seconds:
        cid = f"c{len(out)}"
        if workload == "chat-prefix":
            system = rng.choice(systems)
            n = rng.randint(3, 6)
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
        out.append(Conversation(cid, t, system, turns))
        t += rng.expovariate(rate / mean_turns)
    return out


# -- driving it -----------------------------------------------------------------------------


@dataclass
class Sample:
    conversation: str
    turn: int
    start_unix: float
    end_unix: float
    ok: bool
    status: int
    latency_s: float
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


async def chat(
    client: aiohttp.ClientSession, url: str, conv: Conversation, messages: list[dict[str, str]],
    turn: Turn, index: int,
) -> tuple[Sample, str]:  # fmt: skip
    body = {
        "model": "tiny-gpt", "messages": messages, "max_tokens": turn.max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start, t0 = time.time(), time.perf_counter()
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
        conv.id, index, start, start + latency, check.ok and status == 200, status, latency,
        ttft, int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0),
        int(usage.get("completion_tokens", 0)),
    )  # fmt: skip
    return sample, "".join(text)


async def drive(url: str, convs: list[Conversation], window: tuple[float, float]) -> list[Sample]:
    """Every conversation from its arrival; returns the samples of requests sent in `window`
    (seconds from the start). Conversations arriving after the window are not started; those
    under way run to their end, so the load stays on for the last measured request."""
    samples: list[Sample] = []
    limit = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=limit, connector=connector) as client:
        t0 = time.perf_counter()

        async def run(conv: Conversation) -> None:
            await asyncio.sleep(max(0.0, conv.arrival_s - (time.perf_counter() - t0)))
            messages = [{"role": "system", "content": conv.system}]
            for k, turn in enumerate(conv.turns):
                await asyncio.sleep(turn.think_s)
                messages.append({"role": "user", "content": turn.question})
                sent = time.perf_counter() - t0
                sample, reply = await chat(client, url, conv, messages, turn, k)
                if window[0] <= sent < window[1]:
                    samples.append(sample)
                if not sample.ok:
                    return  # a broken conversation ends; its failure is counted
                messages.append({"role": "assistant", "content": reply})

        await asyncio.gather(*(run(c) for c in convs if c.arrival_s < window[1]))
    return samples


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


@dataclass
class Run:
    workload: str
    front_end: str
    seed: int
    offered_rps: float
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
                "batcher": {"kind": "continuous", "max_num_seqs": 4, "max_batch_tokens": 2048},
            }
        ],
    }
    path = workdir / "replica.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_run(args: argparse.Namespace, workload: str, name: str, seed: int, workdir: Path) -> Run:
    port = free_port_block(args.replicas + 2)
    cluster = ClusterConfig(
        replicas=args.replicas, engine="simulated", replica_config=replica_yaml(workdir),
        first_replica_port=port + 2,
    )  # fmt: skip
    urls = replica_urls(cluster)
    convs = conversations(workload, seed, args.rate, args.warmup_s + args.duration_s, args.think_s)
    window = (args.warmup_s, args.warmup_s + args.duration_s)
    with open(workdir / "processes.log", "ab") as log, replicas_running(cluster, log) as procs:
        asyncio.run(wait_ready(urls, procs))
        with front_end(name, urls, port, seed, workdir, log) as url:
            samples = asyncio.run(drive(url, convs, window))
        served = asyncio.run(replica_requests(urls))
    offered = sum(1 for c in convs for _ in c.turns) / (args.warmup_s + args.duration_s)
    return Run(workload, name, seed, offered, samples, served)


# -- the report -----------------------------------------------------------------------------


def blocks(runs: list[Run], value: str, args: argparse.Namespace) -> list[stats.Block]:
    out: list[stats.Block] = []
    for run in runs:
        ok = [s for s in run.samples if s.ok]
        starts = [s.start_unix for s in run.samples]
        if not ok or not starts:
            continue
        first = min(starts)
        values = [getattr(s, value) for s in ok]
        out += stats.blocks_of([s.start_unix for s in ok], values, first, args.duration_s, 4)
    return out


def summary_rows(runs: list[Run], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for workload in args.workloads:
        base = [r for r in runs if (r.workload, r.front_end) == (workload, BASELINE)]
        for name in args.front_ends:
            mine = [r for r in runs if (r.workload, r.front_end) == (workload, name)]
            if not mine:
                continue
            ok = [s for r in mine for s in r.samples if s.ok]
            sent = sum(len(r.samples) for r in mine)
            ttft = blocks(mine, "ttft_s", args)
            p99 = stats.interval(ttft, stats.p99) if ttft else None
            change = (
                stats.relative_change(ttft, blocks(base, "ttft_s", args), stats.p99)
                if base and name != BASELINE and ttft
                else None
            )
            prompt = sum(s.prompt_tokens for s in ok)
            spread = [max(r.replica_requests) / np.mean(r.replica_requests) for r in mine]
            rows.append(
                {
                    "workload": workload,
                    "front_end": name,
                    "offered_rps": np.mean([r.offered_rps for r in mine]),
                    "sent_rps": sent / (len(mine) * args.duration_s),
                    "requests": sent,
                    "errors": sent - len(ok),
                    "ttft_p50_s": stats.percentile([s.ttft_s for s in ok], 50),
                    "ttft_p99": p99,
                    "ttft_p99_vs_lor": change,
                    "e2e_p99_s": stats.percentile([s.latency_s for s in ok], 99),
                    "per_min_per_instance": 60
                    * len(ok)
                    / (len(mine) * args.duration_s * args.replicas),
                    "cache_hit": sum(s.cached_tokens for s in ok) / prompt if prompt else math.nan,
                    "spread": max(spread),
                }
            )
    return rows


def interval_text(i: stats.Interval | None, scale: float = 1.0, pct: bool = False) -> str:
    if i is None:
        return "-"
    if pct:
        mark = "" if i.excludes_zero else " (n.s.)"
        return f"{i.estimate:+.1%} [{i.low:+.1%}, {i.high:+.1%}]{mark}"
    return f"{i.estimate * scale:.2f} [{i.low * scale:.2f}, {i.high * scale:.2f}]"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Simulated engine (7B/A10G profile, KV 16,000 tokens, 4 sequences per replica), "
        f"{args.replicas} replicas, prefix cache on; conversations arrive as a Poisson process "
        f"for ~{args.rate:g} requests/s over the run (offered: every turn of every conversation "
        "that arrived, over warm-up + window; sent: requests sent inside the window); "
        f"{args.seeds} seeds x {args.duration_s:g} s measured after {args.warmup_s:g} s "
        f"warm-up; think time {args.think_s:g} s. Command: `{command_of(args)}`",
        "",
    ]
    for workload in args.workloads:
        lines += [
            f"### {workload}", "",
            "| Front end | Offered (req/s) | Sent in window (req/s) | Requests | Errors "
            "| TTFT P50 (s) | TTFT P99 (s) [95% CI] "
            "| TTFT P99 vs least_outstanding_requests [95% CI] | E2E P99 (s) | "
            "req/min/instance | Cache hit rate | Load spread (max/mean) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for row in (r for r in rows if r["workload"] == workload):
            lines.append(
                f"| {row['front_end']} | {row['offered_rps']:.2f} | {row['sent_rps']:.2f} | "
                f"{row['requests']} | "
                f"{row['errors']} | {row['ttft_p50_s']:.3f} | {interval_text(row['ttft_p99'])} | "
                f"{interval_text(row['ttft_p99_vs_lor'], pct=True)} | {row['e2e_p99_s']:.2f} | "
                f"{row['per_min_per_instance']:.1f} | {row['cache_hit']:.1%} | "
                f"{row['spread']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], workloads: list[str], out: Path) -> Path:
    """TTFT P99 (with its interval) and the cache hit rate per front end, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110)
    width = 0.8 / len(workloads)
    names = list(dict.fromkeys(r["front_end"] for r in rows))
    for k, workload in enumerate(workloads):
        mine = {r["front_end"]: r for r in rows if r["workload"] == workload}
        xs = [i + k * width for i, n in enumerate(names) if n in mine]
        p99 = [mine[n]["ttft_p99"] for n in names if n in mine]
        estimate = [i.estimate if i else math.nan for i in p99]
        error = [
            [e - i.low if i else 0 for e, i in zip(estimate, p99, strict=True)],
            [i.high - e if i else 0 for e, i in zip(estimate, p99, strict=True)],
        ]
        axes[0].bar(xs, estimate, width, yerr=error, capsize=2, label=workload)
        axes[1].bar(xs, [mine[n]["cache_hit"] for n in names if n in mine], width, label=workload)
    for ax, label in zip(axes, ("TTFT P99 (s), 95% CI", "fleet cache hit rate"), strict=True):
        ax.set_xticks([i + width * (len(workloads) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "ttft_p99_and_cache_hits.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def read(folder: Path) -> tuple[argparse.Namespace, list[Run]]:
    """A result folder's command and runs, from its runs.csv and raw samples."""
    command = (folder / "command.txt").read_text().strip()
    args = recorded_args(command, PROG, parser())
    runs = []
    with open(folder / "runs.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = f"{row['workload']}-{row['front_end'].replace(':', '_')}-seed{row['seed']}"
            with gzip.open(folder / "samples" / f"{name}.csv.gz", "rt", newline="") as g:
                samples = [_sample(r) for r in csv.DictReader(g)]
            served = [float(x) for x in row["replica_requests"].split()]
            offered = float(row["offered_rps"])
            runs.append(
                Run(row["workload"], row["front_end"], int(row["seed"]), offered, samples, served)
            )
    return args, runs


def _sample(row: dict[str, str]) -> Sample:
    kinds = {f.name: f.type for f in fields(Sample)}

    def value(name: str, text: str) -> Any:
        kind = kinds[name]
        if kind == "bool":
            return text == "True"
        return int(text) if kind == "int" else float(text) if kind == "float" else text

    return Sample(**{k: value(k, v) for k, v in row.items()})


def write(runs: list[Run], args: argparse.Namespace) -> str:
    rows = summary_rows(runs, args)
    text = table(rows, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chart(rows, args.workloads, out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for run in runs:
        name = f"{run.workload}-{run.front_end.replace(':', '_')}-seed{run.seed}.csv.gz"
        with gzip.open(out / "samples" / name, "wt", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([fl.name for fl in fields(Sample)])
            writer.writerows([list(asdict(s).values()) for s in run.samples])
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["workload", "front_end", "seed", "offered_rps", "requests",
                         "replica_requests"])  # fmt: skip
        for r in runs:
            served = " ".join(f"{x:.0f}" for x in r.replica_requests)
            writer.writerow([r.workload, r.front_end, r.seed, f"{r.offered_rps:.3f}",
                             len(r.samples), served])  # fmt: skip
    (out / "table.md").write_text(text)
    (out / "command.txt").write_text(command_of(args) + "\n")
    return text


# -- the command line -----------------------------------------------------------------------


def csv_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--replicas", type=int, default=5)
    p.add_argument("--rate", type=float, default=9.0, help="requests/s offered (Poisson)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--duration-s", type=float, default=40.0)
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
        f"{PROG} --replicas {args.replicas} --rate {args.rate:g} --seeds {args.seeds} "
        f"--warmup-s {args.warmup_s:g} --duration-s {args.duration_s:g} --think-s "
        f"{args.think_s:g} --workloads {','.join(args.workloads)} --front-ends "
        f"{','.join(args.front_ends)} --out {args.out}"
    )


def main() -> None:
    args = parser().parse_args()
    if args.render:
        saved, runs = read(args.render)
        rows = summary_rows(runs, saved)
        text = table(rows, saved)
        (args.render / "table.md").write_text(text)
        chart(rows, saved.workloads, args.render)
        print(text)
        return
    unknown = [n for n in args.front_ends if n not in OURS and n not in PEERS]
    if unknown or any(w not in WORKLOADS for w in args.workloads):
        parser().error(f"unknown front ends or workloads: {unknown or args.workloads}")
    args.front_ends = available(args.front_ends)
    exit_on_sigterm()
    workdir = Path(args.out) / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    runs = []
    for workload in args.workloads:
        for seed in range(args.seeds):
            for name in args.front_ends:
                run = one_run(args, workload, name, seed, workdir)
                ok = [s for s in run.samples if s.ok]
                hit = sum(s.cached_tokens for s in ok) / max(1, sum(s.prompt_tokens for s in ok))
                print(
                    f"  {workload:<11} {name:<26} seed {seed}: {len(ok)}/{len(run.samples)} ok, "
                    f"TTFT P99 {stats.percentile([s.ttft_s for s in ok], 99):.3f} s, "
                    f"cache {hit:.0%}, replicas {run.replica_requests}",
                    flush=True,
                )
                runs.append(run)
    print(write(runs, args))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
