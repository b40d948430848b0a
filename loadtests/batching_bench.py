"""Batching benchmark, in-process (batchers + real engines, no HTTP): which batcher gives the most
tokens/s at the same tail latency, and what the prefix cache does to time to first token.

    .venv/bin/python -m loadtests.batching_bench [--engines torch,simulated] [--clients 2,4,...]
        [--duration-s 5] [--seeds 2] [--out loadtests/results/batching]

For each engine and batcher it sweeps the number of closed-loop clients. Each point warms up,
then measures a window: tokens/s counts the tokens emitted inside the window; the latency, time
to first token (TTFT), mean time per output token (TPOT) and inter-token gap (ITL) samples are
of every request sent inside the window, each waited for while the load stays on. Tokens/s "at
equal P99" is the most tokens/s a batcher reaches with its P99 at or under one target (linear
between the sweep points around it): the P99 the static batcher has when its batches are full
(clients = batch size). Percentiles are linear-interpolated over the raw samples of all seeds
(loadtests/analysis/stats.py).
HTTP is left out on purpose: on a 2-core CPU the HTTP stack, not the batcher, would be measured.

Engines: `torch` is tiny-gpt on this machine's CPU (or CUDA with --device cuda); `simulated` is
the built-in 7B/A10G timing profile (decode memory-bound, as on a GPU), time divided by
--sim-speedup. The prefix-cache line sends a 2,000-token prompt twice to the simulated engine's
continuous batcher, cache off and on, and reports the second send's TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests.analysis.stats import percentile
from loadtests.harness.plan import recorded_args
from replica.batching import Batcher
from replica.config import (
    BatcherConfig,
    ContinuousBatcherConfig,
    DynamicBatcherConfig,
    PrefixCacheConfig,
    StaticBatcherConfig,
    TinyGptParams,
)
from replica.engines.base import GenerationEngine
from replica.engines.profile import load_profile
from replica.generation import Completion, GenRequest, TokenEvent
from replica.runtime import generation_batcher, kv_layout

BATCHERS = ("static", "dynamic", "continuous")


@dataclass
class Point:
    """One (engine, batcher, clients, seed) run: raw samples."""

    engine: str
    batcher: str
    clients: int
    seed: int
    duration_s: float
    tokens: int = 0
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)


def output_length(rng: random.Random) -> int:
    """Heavy-tailed: lognormal with median 16 tokens, sigma 1.0, clipped to 1..256."""
    return max(1, min(256, round(rng.lognormvariate(math.log(16), 1.0))))


def configs(args: argparse.Namespace) -> dict[str, BatcherConfig]:
    size = args.batch_size
    return {
        "static": StaticBatcherConfig(
            kind="static", batch_size=size, max_wait_ms=200, max_queue=4096
        ),
        "dynamic": DynamicBatcherConfig(
            kind="dynamic", max_batch_size=size, max_wait_ms=20, max_queue=4096
        ),
        "continuous": ContinuousBatcherConfig(
            kind="continuous",
            max_num_seqs=size,
            max_batch_tokens=args.max_batch_tokens,
            max_queue=4096,
            prefix_cache=PrefixCacheConfig(enabled=False),
        ),
    }


def build_engine(
    kind: str, args: argparse.Namespace, config: BatcherConfig, context: int
) -> GenerationEngine:
    params = TinyGptParams(layers=args.gen_layers, width=args.gen_width, context_len=context)
    if kind == "simulated":
        from replica.engines.simulated import SimulatedGenerationEngine

        profile = load_profile().generation
        speedup = args.sim_speedup
        layout = kv_layout(config, context, profile)
        return SimulatedGenerationEngine(
            profile, sleep=lambda s: time.sleep(s / speedup), kv=layout
        )
    from replica.engines.torch_engine import TorchGenerationEngine, resolve_device

    return TorchGenerationEngine(params, resolve_device(args.device), kv_layout(config, context))


class Gaps:
    """Token times of one request, stamped as each token reaches its sink (perf_counter)."""

    def __init__(self, window: Window) -> None:
        self.gaps: list[float] = []
        self._last = 0.0
        self._window = window

    def on_token(self, _event: TokenEvent) -> None:
        now = time.perf_counter()
        if self._last:
            self.gaps.append(now - self._last)
        self._last = now
        self._window.tokens += self._window.start <= now < self._window.end


@dataclass
class Window:
    """The measured window: tokens emitted inside it, by timestamp."""

    start: float
    end: float
    tokens: int = 0


async def closed_loop(
    point: Point, batcher: Batcher[GenRequest, Completion], context: int, warmup_s: float
) -> Point:
    """Clients submit back to back. Tokens/s: tokens emitted inside the window (after the
    warm-up) per second. Latency samples: every request *sent* inside the window, each waited
    for to the end while the clients keep the load on (selection by send time, so the slowest
    requests are not cut off by the window's end)."""
    now = time.perf_counter()
    window = Window(now + warmup_s, now + warmup_s + point.duration_s)
    measured: set[asyncio.Future[None]] = set()
    stop = asyncio.Event()

    async def client(index: int) -> None:
        rng = random.Random(point.seed * 1000 + index)
        while not stop.is_set():
            gaps = Gaps(window)
            prompt = tuple(rng.randrange(32, 127) for _ in range(rng.randint(8, 64)))
            request = GenRequest((256, *prompt), output_length(rng), context, sink=gaps.on_token)
            sent, sent_monotonic = time.perf_counter(), time.monotonic()
            recorded = window.start <= sent < window.end
            if recorded:
                done_future = asyncio.get_running_loop().create_future()
                measured.add(done_future)
            done = await batcher.submit(request)
            if not recorded:
                continue
            point.latency_s.append(time.perf_counter() - sent)
            point.ttft_s.append(done.first_token_at_s - sent_monotonic)  # tracker: monotonic
            if done.tpot_s is not None:
                point.tpot_s.append(done.tpot_s)
            point.itl_s.extend(gaps.gaps)
            done_future.set_result(None)

    tasks = [asyncio.create_task(client(i)) for i in range(point.clients)]
    await asyncio.sleep(window.end - time.perf_counter())
    if measured:
        await asyncio.wait(measured)  # the load stays on until the last measured one is done
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    point.tokens = window.tokens
    while (load := batcher.load()).queued or load.running:  # let the last batch finish
        await asyncio.sleep(0.01)
    return point


async def sweep(args: argparse.Namespace, executor: Executor) -> list[Point]:
    points: list[Point] = []
    for kind in args.engines:
        for seed in range(args.seeds):
            for clients in args.clients:
                for name in BATCHERS:  # interleaved, so machine noise hits all alike
                    config = configs(args)[name]
                    engine = build_engine(kind, args, config, args.context)
                    batcher = generation_batcher(
                        config, engine, executor=executor, observer=_Null()
                    )
                    point = Point(kind, name, clients, seed, args.duration_s)
                    points.append(await closed_loop(point, batcher, args.context, args.warmup_s))
                    await batcher.close()
                    p99_ms = percentile(point.latency_s, 99) * 1000
                    print(
                        f"  {kind:<9} {name:<10} clients {clients:>3} seed {seed}: "
                        f"{rate(point):8.0f} tok/s  p99 {p99_ms:7.0f} ms",
                        flush=True,
                    )
    return points


class _Null:
    def on_dispatch(self, queue_wait_s: float) -> None: ...
    def on_batch(self, size: int, compute_s: float) -> None: ...
    def on_reject(self, reason: str) -> None: ...


async def prefix_ttft(args: argparse.Namespace, executor: Executor) -> dict[str, float]:
    """TTFT of a 2,000-token prompt sent a second time, prefix cache off and on (simulated)."""
    out = {}
    context = 4096
    prompt = (256, *(32 + (i * 7) % 95 for i in range(1999)))
    for enabled in (False, True):
        config = ContinuousBatcherConfig(
            kind="continuous", max_num_seqs=args.batch_size, max_batch_tokens=4096,
            prefix_cache=PrefixCacheConfig(enabled=enabled),
        )  # fmt: skip
        engine = build_engine("simulated", args, config, context)
        batcher = generation_batcher(config, engine, executor=executor, observer=_Null())
        for attempt in ("first", "second"):
            sent = time.monotonic()
            done = await batcher.submit(GenRequest(prompt, 4, context))
            out[f"{'on' if enabled else 'off'}_{attempt}_s"] = done.first_token_at_s - sent
            out[f"{'on' if enabled else 'off'}_{attempt}_cached"] = done.cached_tokens
        await batcher.close()
    return out


# -- summary -------------------------------------------------------------------------------


def pooled(points: list[Point], engine: str, batcher: str, clients: int) -> Point:
    runs = [p for p in points if (p.engine, p.batcher, p.clients) == (engine, batcher, clients)]
    out = Point(engine, batcher, clients, -1, sum(p.duration_s for p in runs))
    for p in runs:
        out.tokens += p.tokens
        out.latency_s += p.latency_s
        out.ttft_s += p.ttft_s
        out.tpot_s += p.tpot_s
        out.itl_s += p.itl_s
    return out


def at_p99(curve: list[tuple[float, float]], target: float) -> tuple[float, str]:
    """The most tokens/s the (P99, tokens/s) sweep reaches with P99 at or under `target`:
    the best point under it, or linear between a point under it and the next one above.
    `>=`: even the most clients stayed under (the sweep did not reach the target).
    NaN: every point was above it."""
    best = math.nan
    for (p0, t0), (p1, t1) in itertools.pairwise([*curve, (math.inf, math.nan)]):
        if p0 > target:
            continue
        best = t0 if math.isnan(best) else max(best, t0)
        if p1 > target and not math.isinf(p1):
            share = (target - p0) / (p1 - p0)
            best = max(best, t0 + share * (t1 - t0))
    reached = any(p > target for p, _ in curve)
    return best, "" if reached or math.isnan(best) else ">="


def tokens_per_s(value: float, mark: str) -> str:
    return "none under it" if math.isnan(value) else f"{mark}{value:,.0f}"


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def rate(p: Point) -> float:
    return p.tokens / p.duration_s


TARGETS = (1.0, 1.5, 2.0)  # P99 targets, as multiples of the static batcher's at full batches


def equal_p99_lines(
    args: argparse.Namespace, points: list[Point], engine: str, facts: dict[str, Any]
) -> list[str]:
    base = percentile(pooled(points, engine, "static", args.batch_size).latency_s, 99)
    targets = [base * k for k in TARGETS]
    facts[f"{engine}.target_p99_s"] = targets
    heads = [f"P99 ≤ {ms(t)} ms | vs static" for t in targets]
    lines = [
        f"### {facts[f'{engine}.describe']}: tokens/s at equal P99", "",
        f"The most tokens/s each batcher reaches with its P99 at or under a target: the static "
        f"batcher's P99 with full batches ({args.batch_size} clients), 1.5x and 2x it. "
        "Pooled seeds, each seed alone in brackets.", "",
        "| Batcher | " + " | ".join(heads) + " |", "|---|" + "---|---|" * len(targets),
    ]  # fmt: skip
    static: dict[float, float] = {}
    seeds = sorted({p.seed for p in points})
    for name in BATCHERS:
        row = [name]
        for target in targets:
            curve = [pooled(points, engine, name, c) for c in args.clients]
            value, mark = at_p99([(percentile(p.latency_s, 99), rate(p)) for p in curve], target)
            per_seed = []
            for seed in seeds:
                runs = [p for p in points if (p.engine, p.batcher, p.seed) == (engine, name, seed)]
                runs.sort(key=lambda p: p.clients)
                one = at_p99([(percentile(p.latency_s, 99), rate(p)) for p in runs], target)
                per_seed.append(tokens_per_s(*one))
            static.setdefault(target, value)
            facts[f"{engine}.{name}.tokens_per_s_at_p99"] = [
                *facts.get(f"{engine}.{name}.tokens_per_s_at_p99", []),
                value,
            ]
            ratio = value / static[target]
            row += [
                f"{tokens_per_s(value, mark)} [{', '.join(per_seed)}]",
                "-" if math.isnan(ratio) else f"{ratio:.2f}x",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def sweep_lines(
    args: argparse.Namespace, points: list[Point], engine: str, label: str
) -> list[str]:
    lines = [
        f"### {label}: every sweep point", "",
        "| Batcher | Clients | tokens/s | P50 (ms) | P99 (ms) | TTFT P50 | TTFT P99 | TPOT P50 "
        "| TPOT P99 | ITL P99 | ITL max | Requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name in BATCHERS:
        for c in args.clients:
            p = pooled(points, engine, name, c)
            cells = [
                ms(percentile(p.latency_s, 50)), ms(percentile(p.latency_s, 99)),
                ms(percentile(p.ttft_s, 50)), ms(percentile(p.ttft_s, 99)),
                ms(percentile(p.tpot_s, 50)), ms(percentile(p.tpot_s, 99)),
                ms(percentile(p.itl_s, 99)), ms(max(p.itl_s, default=math.nan)),
            ]  # fmt: skip
            row = [name, str(c), f"{rate(p):,.0f}", *cells, str(len(p.latency_s))]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def summary(
    args: argparse.Namespace, points: list[Point], labels: dict[str, str]
) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = []
    facts: dict[str, Any] = {f"{engine}.describe": label for engine, label in labels.items()}
    for engine in args.engines:
        lines += [*equal_p99_lines(args, points, engine, facts), ""]
        lines += [*sweep_lines(args, points, engine, labels[engine]), ""]
    return lines, facts


def describe(engine: str, args: argparse.Namespace) -> str:
    if engine == "simulated":
        return f"Simulated engine (7B/A10G profile, time / {args.sim_speedup:g})"
    import torch

    from replica.engines.torch_engine import resolve_device

    device = resolve_device(args.device)
    return (
        f"Torch engine (tiny-gpt {args.gen_layers}x{args.gen_width}, {device.type}, "
        f"torch threads {torch.get_num_threads()})"
    )


def prefix_lines(result: dict[str, float], speedup: float) -> list[str]:
    off, on = result["off_second_s"], result["on_second_s"]
    return [
        "### Prefix cache: a 2,000-token prompt sent twice", "",
        f"Simulated engine, continuous batcher, time / {speedup:g}; TTFT of each send (ms).", "",
        "| Prefix cache | first send | second send | cached tokens (second) |", "|---|---|---|---|",
        f"| off | {ms(result['off_first_s'])} | {ms(off)} | {result['off_second_cached']:.0f} |",
        f"| on | {ms(result['on_first_s'])} | {ms(on)} | {result['on_second_cached']:.0f} |",
        "", f"Second-send TTFT, off / on: {off / on:.1f}x", "",
    ]  # fmt: skip


async def measure(args: argparse.Namespace) -> tuple[list[Point], dict[str, float]]:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward") as executor:
        points = await sweep(args, executor)
        prefix = await prefix_ttft(args, executor)
    return points, prefix


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def report(args: argparse.Namespace, raw: dict[str, Any], command: str | None) -> str:
    """table.md from the raw samples (and, with `command`, write the folder)."""
    points = [Point(**p) for p in raw["points"]]
    lines, facts = summary(args, points, raw["labels"])
    lines += prefix_lines(raw["prefix_ttft"], args.sim_speedup)
    header = [
        f"Closed-loop clients {args.clients}, {args.warmup_s:g} s warm-up then "
        f"{args.duration_s:g} s per point, {args.seeds} "
        f"seeds; batch size {args.batch_size}; continuous max_batch_tokens "
        f"{args.max_batch_tokens}; prompts 8-64 bytes, outputs lognormal (median 16, sigma 1, "
        f"max 256). Machine: {raw['machine']}.", "",
    ]  # fmt: skip
    text = "\n".join(header + lines)
    if args.out and command is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text)
        (out / "command.txt").write_text(command + "\n")
        with gzip.open(out / "samples.json.gz", "wt") as file:
            json.dump({**raw, "summary": facts}, file)
    return text


def raw_samples(
    args: argparse.Namespace, points: list[Point], prefix: dict[str, float]
) -> dict[str, Any]:
    """What a run measured, times rounded to the microsecond (the file stays small)."""

    def rounded(p: Point) -> dict[str, Any]:
        fields = asdict(p)
        for name in ("latency_s", "ttft_s", "tpot_s", "itl_s"):
            fields[name] = [round(x, 6) for x in fields[name]]
        return fields

    return {
        "points": [rounded(p) for p in points],
        "prefix_ttft": prefix,
        "labels": {engine: describe(engine, args) for engine in args.engines},
        "machine": machine(),
    }


def render(folder: Path) -> str:
    """Rewrite folder/table.md from its samples.json.gz and command.txt (no measuring)."""
    command = (folder / "command.txt").read_text().strip()
    args = recorded_args(command, PROG, parser())
    with gzip.open(folder / "samples.json.gz", "rt") as file:
        raw = json.load(file)
    return report(args, raw, command)


def csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x) for x in text.split(",") if x]


PROG = "python -m loadtests.batching_bench"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--engines", type=csv(str), default=["torch", "simulated"])
    parser.add_argument("--clients", type=csv(int), default=[2, 4, 8, 16, 24, 32, 48])
    parser.add_argument("--duration-s", type=float, default=5.0, help="per sweep point")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="before each window")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--batch-size", type=int, default=16, help="static/dynamic batch, max_num_seqs"
    )
    parser.add_argument("--max-batch-tokens", type=int, default=256, help="continuous step budget")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sim-speedup", type=float, default=4.0, help="simulated time divisor")
    parser.add_argument("--gen-layers", type=int, default=2)
    parser.add_argument("--gen-width", type=int, default=128)
    parser.add_argument(
        "--torch-threads", type=int, help="torch intra-op threads (a replica's torch_threads)"
    )
    parser.add_argument("--out", help="write table.md, command.txt and samples.json.gz here")
    parser.add_argument(
        "--render", type=Path, help="only rewrite this result folder's table.md from its samples"
    )
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.render:
        print(render(args.render))
        return
    if args.batch_size not in args.clients:
        parser().error("--clients must include --batch-size (the target P99 is measured there)")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    raw = raw_samples(args, *asyncio.run(measure(args)))
    print("\n" + report(args, raw, " ".join([PROG, *sys.argv[1:]])))


if __name__ == "__main__":
    main()
