"""Turns benchmark runs into the published artefacts: per-run and summary CSV, a markdown table
in the layout of SageMaker's routing comparison, and PNG charts (one line per strategy).

Every summary says what load its runs were offered (requests sent per second in the window)
against the capacity measured on the same replicas (a saturation run, see loadtests/bench.py)."""

from __future__ import annotations

import csv
import gzip
import math
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from loadtests.analysis import stats
from loadtests.harness.runner import RunResult
from loadtests.load.samples import Sample

BASELINE = "random"
Scenario = tuple[int, int]  # (users, instances)


@dataclass(frozen=True)
class Load:
    """A scenario's offered load setting against what its replicas can do."""

    capacity_rps: float  # measured completions/s with every slot always full; NaN: not measured
    target_rps: float | None = None  # the open-loop Poisson rate; None in closed loop


UNMEASURED = Load(math.nan)


@dataclass(frozen=True)
class Summary:
    """One scenario and strategy, pooled over its seeds."""

    users: int
    instances: int
    strategy: str
    runs: int
    requests: int
    errors: int
    p50_s: float
    p90_s: float
    p99_s: float
    ttft_p99_s: float
    per_token_p99_s: float
    throughput_per_min_per_instance: float
    saturated_runs: int
    p99_change: stats.Interval | None
    throughput_change: stats.Interval | None
    offered_rps: float  # requests sent per second in the window, mean over the runs
    load: Load = UNMEASURED

    @property
    def offered_share(self) -> float:
        return self.offered_rps / self.load.capacity_rps

    @property
    def served(self) -> int:
        """Requests in the window that succeeded: what its latency percentiles are over."""
        return self.requests - self.errors


def sent_in_window(run: RunResult) -> list[Sample]:
    """Requests sent inside the measurement window: what the run offered."""
    end = run.window_start + run.spec.duration_s
    return [s for s in run.samples if run.window_start <= s.start_unix < end]


def completed_rps(run: RunResult) -> float:
    """Successful requests per second that ended in the window (a saturation run's capacity)."""
    return sum(s.ok for s in in_window(run)) / run.spec.duration_s


def in_window(run: RunResult) -> list[Sample]:
    """Requests that ended inside the measurement window (steady state: the warm-up is cut)."""
    end = run.window_start + run.spec.duration_s
    return [s for s in run.samples if run.window_start <= s.end_unix < end]


def blocks(run: RunResult, block_s: float) -> list[stats.Block]:
    ok = [s for s in in_window(run) if s.ok]
    n = max(1, round(run.spec.duration_s / block_s))
    ends, latencies = [s.end_unix for s in ok], [s.latency_s for s in ok]
    return stats.blocks_of(ends, latencies, run.window_start, run.spec.duration_s, n)


def summarize(
    runs: Sequence[RunResult], block_s: float, loads: Mapping[Scenario, Load] | None = None
) -> list[Summary]:
    groups: dict[tuple[int, int, str], list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[(run.spec.users, run.spec.instances, run.spec.strategy)].append(run)
    block_sets = {
        key: [b for r in group for b in blocks(r, block_s)] for key, group in groups.items()
    }
    out = []
    for (users, instances, strategy), group in groups.items():
        own = block_sets[(users, instances, strategy)]
        base = block_sets.get((users, instances, BASELINE))
        p99_change = throughput_change = None
        if base is not None and strategy != BASELINE:
            p99_change = stats.relative_change(own, base, stats.p99)
            throughput_change = stats.relative_change(own, base, stats.per_minute)
        summary = _summary(users, instances, strategy, group, own, p99_change, throughput_change)
        out.append(replace(summary, load=(loads or {}).get((users, instances), UNMEASURED)))
    return sorted(out, key=lambda s: (s.instances, s.users, s.strategy))


def _summary(
    users: int,
    instances: int,
    strategy: str,
    group: Sequence[RunResult],
    own: Sequence[stats.Block],
    p99_change: stats.Interval | None,
    throughput_change: stats.Interval | None,
) -> Summary:
    window = [s for run in group for s in in_window(run)]
    ok = [s for s in window if s.ok]
    latencies = [s.latency_s for s in ok]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    per_token = [s.latency_s / s.tokens for s in ok if s.tokens > 0]
    return Summary(
        users,
        instances,
        strategy,
        len(group),
        len(window),
        len(window) - len(ok),
        stats.percentile(latencies, 50),
        stats.percentile(latencies, 90),
        stats.percentile(latencies, 99),
        stats.percentile(ttfts, 99),
        stats.percentile(per_token, 99),
        stats.per_minute(own) / instances,
        sum(run.saturated for run in group),
        p99_change,
        throughput_change,
        sum(len(sent_in_window(run)) / run.spec.duration_s for run in group) / len(group),
    )


def _pct(interval: stats.Interval | None) -> str:
    if interval is None or math.isnan(interval.estimate):
        return ""
    mark = "" if interval.excludes_zero else " (n.s.)"
    return (
        f"{interval.estimate * 100:+.1f}% [{interval.low * 100:+.1f}, "
        f"{interval.high * 100:+.1f}]{mark}"
    )


def markdown(summaries: Sequence[Summary], header: str) -> str:
    strategies = sorted({s.strategy for s in summaries}, key=lambda n: (n != BASELINE, n))
    by_key = {(s.instances, s.users, s.strategy): s for s in summaries}
    scenarios = sorted({(s.instances, s.users) for s in summaries})
    others = [name for name in strategies if name != BASELINE]
    lines = [header, ""]
    for title, value, change, fmt in (
        ("P99 end-to-end latency (s)", "p99_s", "p99_change", "{:.2f}"),
        (
            "Throughput per minute per instance",
            "throughput_per_min_per_instance",
            "throughput_change",
            "{:.1f}",
        ),
    ):
        cols = [*strategies, *(f"{n} vs random [95% CI]" for n in others)]
        lines += [
            f"### {title}",
            "",
            "| Test | Users | Instances | " + " | ".join(cols) + " |",
            "|" + "---|" * (3 + len(cols)),
        ]
        for i, (instances, users) in enumerate(scenarios, 1):
            row = [str(i), str(users), str(instances)]
            row += [_fmt(by_key.get((instances, users, n)), value, fmt) for n in strategies]
            base = by_key.get((instances, users, BASELINE))
            row += [
                _change(by_key[(instances, users, n)], base, change)
                for n in others
                if (instances, users, n) in by_key
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "### Detail",
        "",
        "| Users | Instances | Strategy | Offered (req/s) | Capacity (req/s) | Offered / capacity "
        "| Requests | Errors | P50 (s) | P90 (s) | P99 (s) | P99 TTFT (s) "
        "| P99 per output token (ms) | Saturated runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.users} | {s.instances} | {s.strategy} | {s.offered_rps:.2f} | "
            f"{_number(s.load.capacity_rps, '{:.2f}')} | {_number(s.offered_share, '{:.0%}')} | "
            f"{s.requests} | {s.errors} | "
            f"{s.p50_s:.2f} | {s.p90_s:.2f} | {s.p99_s:.2f} | {s.ttft_p99_s:.3f} | "
            f"{s.per_token_p99_s * 1000:.1f} | {s.saturated_runs}/{s.runs} |"
        )
    return "\n".join(lines) + "\n"


def _change(summary: Summary, base: Summary | None, change: str) -> str:
    """A change against random, or for a P99 from too few requests on either side, why not."""
    if change == "p99_change":
        fewest = min(s.served for s in (summary, base) if s is not None)
        if not stats.tail_measured(fewest):
            return f"too few samples ({fewest} requests, a P99 needs {stats.MIN_TAIL_SAMPLES})"
    return _pct(getattr(summary, change))


def _number(value: float, fmt: str) -> str:
    return "not measured" if math.isnan(value) else fmt.format(value)


def _fmt(summary: Summary | None, field: str, fmt: str) -> str:
    return fmt.format(getattr(summary, field)) if summary else ""


def write_csv(path: Path, summaries: Sequence[Summary]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "users",
                "instances",
                "strategy",
                "runs",
                "requests",
                "errors",
                "p50_s",
                "p90_s",
                "p99_s",
                "ttft_p99_s",
                "per_token_p99_s",
                "throughput_per_min_per_instance",
                "saturated_runs",
                "p99_change",
                "p99_change_low",
                "p99_change_high",
                "throughput_change",
                "throughput_change_low",
                "throughput_change_high",
                "offered_rps",
                "target_rps",
                "capacity_rps",
                "offered_share",
            ]
        )
        for s in summaries:
            changes: list[object] = []
            for interval in (s.p99_change, s.throughput_change):
                changes += (
                    [interval.estimate, interval.low, interval.high] if interval else ["", "", ""]
                )
            writer.writerow(
                [
                    s.users,
                    s.instances,
                    s.strategy,
                    s.runs,
                    s.requests,
                    s.errors,
                    f"{s.p50_s:.4f}",
                    f"{s.p90_s:.4f}",
                    f"{s.p99_s:.4f}",
                    f"{s.ttft_p99_s:.4f}",
                    f"{s.per_token_p99_s:.5f}",
                    f"{s.throughput_per_min_per_instance:.2f}",
                    s.saturated_runs,
                    *changes,
                    f"{s.offered_rps:.4f}",
                    "" if s.load.target_rps is None else f"{s.load.target_rps:.4f}",
                    "" if math.isnan(s.load.capacity_rps) else f"{s.load.capacity_rps:.4f}",
                    "" if math.isnan(s.offered_share) else f"{s.offered_share:.4f}",
                ]
            )


RUN_COLUMNS = (
    "users",
    "instances",
    "strategy",
    "seed",
    "samples",
    "in_window",
    "cpu_machine_mean",
    "cpu_generator_p90",
    "cpu_gateway_p90",
    "saturated",
)


def _run_row(r: RunResult) -> list[object]:
    return [
        r.spec.users,
        r.spec.instances,
        r.spec.strategy,
        r.spec.seed,
        len(r.samples),
        len(in_window(r)),
        f"{r.cpu_machine_mean:.1f}",
        f"{r.cpu_generator_p90:.1f}",
        f"{r.cpu_gateway_p90:.1f}",
        int(r.saturated),
    ]


def write_runs_csv(path: Path, runs: Sequence[RunResult]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RUN_COLUMNS)
        writer.writerows(_run_row(r) for r in runs)


def write_capacity_csv(path: Path, saturation: Mapping[Scenario, RunResult]) -> None:
    """Each scenario's saturation run (`users` are the run's own, `scenario_users` the
    scenario's) and the capacity it measured."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("scenario_users", *RUN_COLUMNS, "capacity_rps"))
        for (users, _), r in saturation.items():
            writer.writerow([users, *_run_row(r), f"{completed_rps(r):.4f}"])


def charts(out: Path, summaries: Sequence[Summary]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, field, ylabel in (
        ("p99_vs_instances.png", "p99_s", "P99 end-to-end latency (s)"),
        (
            "throughput_per_instance_vs_instances.png",
            "throughput_per_min_per_instance",
            "requests per minute per instance",
        ),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for strategy in sorted({s.strategy for s in summaries}):
            points = sorted(
                (s.instances, getattr(s, field)) for s in summaries if s.strategy == strategy
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=strategy)
        ax.set_xticks(sorted({s.instances for s in summaries}))
        ax.set_xlabel("instances (users = 4 x instances)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)
    return paths


def keep_samples(out: Path, run: RunResult, source: Path) -> None:
    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    s = run.spec
    target = folder / f"u{s.users}-n{s.instances}-{s.strategy}-seed{s.seed}.csv.gz"
    with source.open("rb") as src, gzip.open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
