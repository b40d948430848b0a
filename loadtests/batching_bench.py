"""Batching benchmark on this machine's torch engine (in-process: batchers + real forward passes).

Closed-loop clients keep the batcher saturated; latency percentiles come from raw per-request
samples. Part 1: classifier under none / static / dynamic. Part 2: tiny-gpt generation with
heavy-tailed (lognormal) output lengths under static vs continuous (and dynamic).

    .venv/bin/python loadtests/batching_bench.py [--duration-s 3] [--rounds 3] [--clients 64]

HTTP is left out on purpose: on a 2-core CPU the HTTP stack, not the model, would be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import random
import statistics
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from replica.batching import Batcher
from replica.batching.observer import NullObserver
from replica.config import (
    BatcherConfig,
    ClassifierParams,
    ContinuousBatcherConfig,
    DynamicBatcherConfig,
    NoneBatcherConfig,
    StaticBatcherConfig,
    TinyGptParams,
)
from replica.engines.base import GenerationEngine
from replica.engines.profile import load_profile
from replica.engines.simulated import SimulatedGenerationEngine
from replica.engines.torch_engine import (
    TorchClassifierEngine,
    TorchGenerationEngine,
    resolve_device,
)
from replica.generation import GenRequest
from replica.runtime import generation_batcher, request_batcher


class BatchSizes(NullObserver):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_batch(self, size: int, compute_s: float) -> None:
        self.sizes.append(size)


@dataclass(frozen=True)
class Result:
    name: str
    requests: int
    units: int  # rows or generated tokens
    elapsed_s: float
    latencies_s: list[float]
    mean_batch: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)  # nearest-rank on raw samples
        return ordered[rank]

    def row(self, unit: str) -> str:
        rate = self.requests / self.elapsed_s
        per_unit = self.units / self.elapsed_s
        return (
            f"{self.name:<12} {rate:9.1f} req/s {per_unit:10.1f} {unit}/s"
            f"   p50 {self.percentile(50) * 1000:8.1f} ms"
            f"   p99 {self.percentile(99) * 1000:8.1f} ms"
            f"   mean batch {self.mean_batch:5.1f}   (n={self.requests})"
        )


async def closed_loop(
    name: str,
    clients: int,
    duration_s: float,
    one: Callable[[random.Random], Awaitable[int]],
    idle: Callable[[], bool],
) -> Result:
    """Clients submit back-to-back for `duration_s`; only work finished inside the window counts
    (a round's drain tail would otherwise dominate short rounds of long generations)."""
    latencies: list[float] = []
    units = 0
    started = time.perf_counter()
    deadline = started + duration_s

    async def client(seed: int) -> None:
        nonlocal units
        rng = random.Random(seed)
        while True:
            sent = time.perf_counter()
            done = await one(rng)
            finished = time.perf_counter()
            if finished > deadline:
                return
            units += done
            latencies.append(finished - sent)

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.sleep(duration_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    while not idle():  # let a batch in the forward pass finish before the next round
        await asyncio.sleep(0.01)
    return Result(name, len(latencies), units, duration_s, latencies)


def batcher_configs(size: int, wait_ms: float) -> dict[str, BatcherConfig]:
    return {
        "none": NoneBatcherConfig(kind="none", max_queue=4096),
        "static": StaticBatcherConfig(
            kind="static", batch_size=size, max_wait_ms=200, max_queue=4096
        ),
        "dynamic": DynamicBatcherConfig(
            kind="dynamic", max_batch_size=size, max_wait_ms=wait_ms, max_queue=4096
        ),
        "continuous": ContinuousBatcherConfig(kind="continuous", max_num_seqs=size, max_queue=4096),
    }


def _idle(batcher: Any) -> bool:
    load = batcher.load()
    return bool(load.queued == 0 and load.running == 0)


async def run_rounds(
    args: argparse.Namespace,
    clients: int,
    batchers: dict[str, tuple[Any, BatchSizes]],
    one_for: Callable[[Any], Callable[[random.Random], Awaitable[int]]],
) -> list[Result]:
    """Interleave short rounds of each batcher so machine noise hits all of them alike."""
    merged: dict[str, list[Result]] = {name: [] for name in batchers}
    for _ in range(args.rounds):
        for name, (batcher, _seen) in batchers.items():
            result = await closed_loop(
                name, clients, args.duration_s, one_for(batcher), functools.partial(_idle, batcher)
            )
            merged[name].append(result)
    out = []
    for name, parts in merged.items():
        out.append(
            Result(
                name,
                sum(p.requests for p in parts),
                sum(p.units for p in parts),
                sum(p.elapsed_s for p in parts),
                [x for p in parts for x in p.latencies_s],
                statistics.fmean(batchers[name][1].sizes),
            )
        )
    for batcher, _seen in batchers.values():
        await batcher.close()
    return out


async def bench_classifier(args: argparse.Namespace, executor: Any) -> list[Result]:
    params = ClassifierParams()
    engine = TorchClassifierEngine(params, resolve_device(args.device))
    rows = [array("f", [random.random() for _ in range(params.input_size)]) for _ in range(64)]
    batchers: dict[str, tuple[Any, BatchSizes]] = {}
    for name in ("none", "static", "dynamic"):
        seen = BatchSizes()
        config = batcher_configs(32, 5.0)[name]
        batchers[name] = (
            request_batcher(config, engine.infer, executor=executor, observer=seen),
            seen,
        )

    def one_for(
        batcher: Batcher[array[float], array[float]],
    ) -> Callable[[random.Random], Awaitable[int]]:
        async def one(rng: random.Random) -> int:
            await batcher.submit(rng.choice(rows))
            return 1

        return one

    return await run_rounds(args, args.clients, batchers, one_for)


def output_length(rng: random.Random) -> int:
    """Heavy-tailed: lognormal with median 16 tokens, sigma 1.0, clipped to 1..256."""
    return max(1, min(256, round(rng.lognormvariate(math.log(16), 1.0))))


async def bench_generation(args: argparse.Namespace, executor: Any) -> list[Result]:
    params = TinyGptParams(layers=args.gen_layers, width=args.gen_width)
    engine: GenerationEngine = TorchGenerationEngine(params, resolve_device(args.device))
    if args.gen_engine == "simulated":
        engine = SimulatedGenerationEngine(
            load_profile().generation, sleep=lambda s: time.sleep(s / args.sim_speedup)
        )
    batchers: dict[str, tuple[Any, BatchSizes]] = {}
    for name in ("static", "dynamic", "continuous"):
        seen = BatchSizes()
        config = batcher_configs(16, 20.0)[name]
        batchers[name] = (
            generation_batcher(config, engine, executor=executor, observer=seen),
            seen,
        )

    def one_for(batcher: Batcher[GenRequest, Any]) -> Callable[[random.Random], Awaitable[int]]:
        async def one(rng: random.Random) -> int:
            prompt = tuple(rng.randrange(32, 127) for _ in range(rng.randint(8, 64)))
            request = GenRequest((256, *prompt), output_length(rng), params.context_len)
            return len((await batcher.submit(request)).token_ids)

        return one

    return await run_rounds(args, args.gen_clients, batchers, one_for)


def describe_gen(args: argparse.Namespace) -> str:
    if args.gen_engine == "simulated":
        return f"simulated engine, 7B/A10G profile, time / {args.sim_speedup:g}"
    return f"torch engine, {args.gen_layers} layers, width {args.gen_width}"


def ratio_line(label: str, num: Result, den: Result, per_unit: bool) -> str:
    a = (num.units if per_unit else num.requests) / num.elapsed_s
    b = (den.units if per_unit else den.requests) / den.elapsed_s
    p99 = f"{num.percentile(99) * 1000:.0f} ms vs {den.percentile(99) * 1000:.0f} ms"
    return f"{label}: {a / b:.2f}x  (p99 {p99})"


async def main_async(args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    device, threads = resolve_device(args.device), torch.get_num_threads()
    print(f"torch {torch.__version__}, device {device}, threads {threads}")
    with ThreadPoolExecutor(max_workers=1) as executor:
        if not args.skip_classifier:
            print(f"\nclassifier (1024 -> 2048 -> 2048 -> 10 MLP), {args.clients} clients")
            cls = await bench_classifier(args, executor)
            for r in cls:
                print(r.row("rows"))
            print(ratio_line("dynamic / none throughput", cls[2], cls[0], per_unit=False))
        print(f"\ntiny-gpt ({describe_gen(args)}), lognormal output lengths")
        print(f"{args.gen_clients} closed-loop clients")
        gen = await bench_generation(args, executor)
        for r in gen:
            print(r.row("tok"))
        print(ratio_line("continuous / static tokens/s", gen[2], gen[0], per_unit=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration-s", type=float, default=3.0, help="per round and batcher")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64, help="classifier clients")
    parser.add_argument("--gen-clients", type=int, default=32, help="generation clients")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gen-engine", choices=["torch", "simulated"], default="torch")
    parser.add_argument("--sim-speedup", type=float, default=10.0, help="simulated time divisor")
    parser.add_argument("--skip-classifier", action="store_true")
    parser.add_argument("--gen-layers", type=int, default=2)
    parser.add_argument("--gen-width", type=int, default=128)
    args = parser.parse_args()
    random.seed(0)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
