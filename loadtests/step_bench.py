"""Decode step micro-benchmark: one step of `rows` sequences at the same contexts, as the static
batcher runs it and as the continuous batcher runs it, on the torch engine (tiny-gpt).

    .venv/bin/python -m loadtests.step_bench [--rows 16] [--prompts 64] [--steps 128]
        [--repeats 5] [--torch-threads 1] [--device cpu] [--inline] [--out FILE]

Each path gets the same `rows` requests (prompt lengths from `--prompts`: one length, or
`MIN-MAX` spread evenly over the rows), all submitted at once, each generating `--steps` tokens,
so both decode the same positions. A step's time is the gap between two tokens of one sequence
as its sink sees them: for the static batcher the whole step of `generate_batch` on the forward
thread; for the continuous batcher the engine step plus its scheduling and bookkeeping, also on
the forward thread, and the hand-off to the event loop at each slice's end. Reported: the median
gap over every decode step of every repeat (wall), the process CPU time per step (less sensitive
to other work on the machine), and the median of the engine's `step` alone. The paths alternate
repeat by repeat, so other work on the machine hits both alike. `--inline` runs both on the
event loop instead of the forward thread.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from replica.batching import ContinuousBatcher
from replica.batching.testing import InlineExecutor
from replica.config import StaticBatcherConfig, TinyGptParams
from replica.engines.base import KvLayout, StepPlan, generate_batch
from replica.generation import GenRequest, TokenEvent

PROG = "python -m loadtests.step_bench"


@dataclass
class Timings:
    gaps_s: list[float] = field(default_factory=list)  # token to token, one sequence
    engine_s: list[float] = field(default_factory=list)  # engine.step, decode-only plans
    cpu_s: float = 0.0
    steps: int = 0

    def line(self, name: str) -> str:
        cells = [
            statistics.median(self.gaps_s),
            statistics.fmean(self.gaps_s),
            self.cpu_s / max(1, self.steps),
            statistics.median(self.engine_s),
        ]
        return f"| {name} | " + " | ".join(ms(c) for c in cells) + " |"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


class TimedEngine:
    """The engine, with each decode-only step timed (what the step's compute costs)."""

    def __init__(self, engine: object, timings: Timings) -> None:
        self._engine = engine
        self.kv: KvLayout = engine.kv  # type: ignore[attr-defined]
        self._timings = timings

    def step(self, plan: StepPlan) -> dict[int, int]:
        started = time.perf_counter()
        out: dict[int, int] = self._engine.step(plan)  # type: ignore[attr-defined]
        if plan.size and all(w.is_decode for w in plan.work):
            self._timings.engine_s.append(time.perf_counter() - started)
            self._timings.steps += 1
        return out


def requests(args: argparse.Namespace, on_token: Callable[[TokenEvent], None]) -> list[GenRequest]:
    low, _, high = args.prompts.partition("-")
    lengths = [int(low)] * args.rows
    if high:
        spread = (int(high) - int(low)) / max(1, args.rows - 1)
        lengths = [round(int(low) + spread * row) for row in range(args.rows)]
    out = []
    for row, length in enumerate(lengths):
        prompt = (256, *(32 + (row * 31 + i * 7) % 95 for i in range(length - 1)))
        sink = on_token if row == 0 else _drop
        out.append(GenRequest(prompt, args.steps, args.context, sink=sink))
    return out


def _drop(_event: TokenEvent) -> None:
    return None


class Stamps:
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_token(self, _event: TokenEvent) -> None:
        self.times.append(time.perf_counter())

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


def engine(args: argparse.Namespace, layout: KvLayout) -> object:
    from replica.engines.torch_engine import TorchGenerationEngine, resolve_device

    params = TinyGptParams(
        layers=args.gen_layers, width=args.gen_width, context_len=args.context, dtype=args.dtype
    )
    return TorchGenerationEngine(params, resolve_device(args.device), layout)


def build(args: argparse.Namespace) -> tuple[TimedEngine, Timings, ContinuousBatcher, Timings]:
    """The static path's engine (KV sized as the static batcher's) and the continuous batcher
    over its own engine (KV sized as the continuous batcher's), each timed."""
    from replica.config import ContinuousBatcherConfig, PrefixCacheConfig
    from replica.runtime import kv_layout

    static_timings, continuous_timings = Timings(), Timings()
    layout = kv_layout(StaticBatcherConfig(kind="static", batch_size=args.rows), args.context)
    static = TimedEngine(engine(args, layout), static_timings)
    config = ContinuousBatcherConfig(
        kind="continuous", max_num_seqs=args.rows, max_batch_tokens=args.max_batch_tokens,
        prefix_cache=PrefixCacheConfig(enabled=False),
    )  # fmt: skip
    timed = TimedEngine(engine(args, kv_layout(config, args.context)), continuous_timings)
    batcher = ContinuousBatcher(
        timed,
        executor=args.executor,
        max_num_seqs=args.rows,
        max_batch_tokens=args.max_batch_tokens,
    )
    return static, static_timings, batcher, continuous_timings


async def measure(args: argparse.Namespace) -> tuple[Timings, Timings]:
    """Repeats alternate between the paths, so other work on the machine hits both alike. The
    static path runs `generate_batch` on the forward thread, as the static batcher does."""
    static, static_timings, batcher, continuous_timings = build(args)
    loop = asyncio.get_running_loop()
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        for timings in (static_timings, continuous_timings):
            stamps = Stamps()
            batch = requests(args, stamps.on_token)
            cpu = time.process_time()
            if timings is static_timings:
                await loop.run_in_executor(args.executor, generate_batch, static, batch)
            else:
                await asyncio.gather(*(batcher.submit(r) for r in batch))
            if repeat:
                timings.cpu_s += time.process_time() - cpu
                timings.gaps_s += stamps.gaps()
            else:
                timings.engine_s.clear()
                timings.steps = 0
    await batcher.close()
    return static_timings, continuous_timings


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompts", default="64", help="prompt length, or MIN-MAX over the rows")
    parser.add_argument("--steps", type=int, default=128, help="tokens each sequence generates")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-batch-tokens", type=int, default=256, help="continuous budget")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--gen-layers", type=int, default=2)
    parser.add_argument("--gen-width", type=int, default=128)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--inline", action="store_true", help="steps on the event loop")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    return parser


def main() -> None:
    args = parser().parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward") as executor:
        args.executor = InlineExecutor() if args.inline else executor
        static, continuous = asyncio.run(measure(args))
    ratio = statistics.median(continuous.gaps_s) / statistics.median(static.gaps_s)
    lines = [
        f"`{' '.join([PROG, *sys.argv[1:]])}`", "",
        f"tiny-gpt {args.gen_layers}x{args.gen_width} {args.dtype}, {args.device}, torch threads "
        f"{args.torch_threads}; {args.rows} rows, prompts {args.prompts} tokens, {args.steps} "
        f"decode steps each, {args.repeats} repeats. Times per decode step (ms).", "",
        "| Path | step, median (wall) | step, mean | CPU per step | engine.step, median |",
        "|---|---|---|---|---|",
        static.line("static (generate_batch)"), continuous.line("continuous (ContinuousBatcher)"),
        "", f"Continuous / static step: {ratio:.2f}x", "",
    ]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
