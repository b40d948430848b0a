"""The committed result folders: each command.txt is a full command that the benchmark's own
parser accepts and that names what its table shows, and README's result tables are exactly what
`python -m loadtests.readme` writes from those folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from loadtests import (
    batching_bench,
    flow_bench,
    frontends_bench,
    jobs_bench,
    prefix_bench,
    readme,
    step_bench,
    tracing_bench,
)
from loadtests.harness.plan import (
    HAPROXY,
    PROG,
    build_plan,
    command_of,
    known_front_ends,
    parse_command,
    parser,
    recorded_args,
)

RESULTS = readme.ROOT / "loadtests" / "results"
FOLDERS = sorted(p.name for p in RESULTS.iterdir() if p.is_dir())
PREFIX = [f for f in FOLDERS if f.startswith("prefix-")]
BENCH = [f for f in FOLDERS if (RESULTS / f / "runs.csv").exists() and f not in PREFIX]
JOBS = [f for f in FOLDERS if f.startswith("jobs-")]
BATCHING = [f for f in FOLDERS if f.startswith("batching")]
FRONT_ENDS = [f for f in FOLDERS if f.startswith("front-ends")]
FLOW = [f for f in FOLDERS if f.startswith("flow-")]
TRACING = [f for f in FOLDERS if f.startswith("tracing")]
STEP = [f for f in FOLDERS if f.startswith("step-bench")]


def test_every_folder_is_a_known_kind_of_result() -> None:
    assert sorted(BENCH + JOBS + BATCHING + PREFIX + FRONT_ENDS + FLOW + TRACING + STEP) == FOLDERS
    assert BENCH and JOBS and BATCHING and FRONT_ENDS and FLOW and TRACING and STEP


@pytest.mark.parametrize("folder", STEP)
def test_step_bench_table_names_its_command_and_its_ratio_is_its_rows(folder: str) -> None:
    lines = (RESULTS / folder / "table.md").read_text().splitlines()
    command = lines[0].strip("`")
    assert command.startswith(f"{step_bench.PROG} ")
    args = step_bench.parser().parse_args(command.split()[len(step_bench.PROG.split()) :])
    assert args.out == Path("loadtests/results") / folder / "table.md"
    medians = {
        cells[0]: float(cells[1])
        for line in lines
        if line.startswith(("| static", "| continuous"))
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    ratio = medians["continuous (ContinuousBatcher)"] / medians["static (generate_batch)"]
    (stated,) = [line for line in lines if line.startswith("Continuous / static step: ")]
    # the cells are rounded to 0.01 ms, the stated ratio is of the unrounded medians
    assert abs(float(stated.split(": ")[1].rstrip("x")) - ratio) < 0.015, (stated, ratio)


@pytest.mark.parametrize("folder", FLOW)
def test_flow_command_parses_and_names_what_its_table_shows(folder: str) -> None:
    command = (RESULTS / folder / "command.txt").read_text().strip()
    args = recorded_args(command, flow_bench.PROG, flow_bench.parser())
    assert flow_bench.command_of(args) == command  # every option spelled out
    assert args.out == Path("loadtests/results") / folder
    table = (RESULTS / folder / "table.md").read_text()
    assert table.splitlines()[0] == f"Command: `{command}`"
    titles = {
        "noisy": "Noisy neighbour",
        "fairness": "Fairness",
        "limits": "Limits across gateways",
    }
    assert set(readme.sections(table)) == {titles[part] for part in args.only.split(",")}


@pytest.mark.parametrize("folder", TRACING)
def test_tracing_command_parses_and_names_what_its_table_shows(folder: str) -> None:
    command = (RESULTS / folder / "command.txt").read_text().strip()
    args = recorded_args(command, tracing_bench.PROG, tracing_bench.parser())
    assert tracing_bench.command_of(args) == command  # every option spelled out
    assert args.out == Path("loadtests/results") / folder
    lines = (RESULTS / folder / "table.md").read_text().splitlines()
    assert lines[0] == f"Command: `{command}`"
    assert f"{args.rounds} rounds;" in lines[2] and f"for {args.seconds:g} s" in lines[2]
    sections = readme.sections("\n".join(lines))
    assert list(sections) == [tracing_bench.SECTION]
    table = sections[tracing_bench.SECTION]
    modes = tracing_bench.modes(args)
    assert [row[0] for row in table.rows] == [tracing_bench.label(m) for m in modes]
    spans = [int(row[table.column("spans")].replace(",", "")) for row in table.rows]
    assert spans[0] == 0 and all(n > 0 for n in spans[1:])  # off sends none; on sends some


@pytest.mark.parametrize("folder", FRONT_ENDS)
def test_front_ends_table_names_its_command_and_holds_every_repeat(folder: str) -> None:
    command = (RESULTS / folder / "command.txt").read_text().strip()
    assert command.startswith(frontends_bench.PROG + " ")
    assert f"--out loadtests/results/{folder}" in command
    table = (RESULTS / folder / "table.md").read_text()
    assert f"Command: `{command}`" in table
    repeats = int(re.search(r"--repeats (\d+)", command).group(1))  # type: ignore[union-attr]
    runs = [json.loads(line) for line in (RESULTS / folder / "runs.jsonl").read_text().splitlines()]
    seen = {(r["front_end"], r["scenario"], r["repeat"]) for r in runs}
    names = {r["front_end"] for r in runs}
    scenarios = {r["scenario"] for r in runs}
    assert len(seen) == len(runs) == len(names) * len(scenarios) * repeats
    assert {"direct", "infergate:workers=1", "infergate:workers=2"} <= names


@pytest.mark.parametrize("folder", PREFIX)
def test_prefix_command_parses_and_names_what_its_table_shows(folder: str) -> None:
    command = (RESULTS / folder / "command.txt").read_text().strip()
    args = recorded_args(command, prefix_bench.PROG, prefix_bench.parser())
    assert prefix_bench.command_of(args) == command  # every option spelled out
    assert args.out == str(Path("loadtests/results") / folder)
    table = (RESULTS / folder / "table.md").read_text()
    assert f"Command: `{command}`" in table.splitlines()[0]
    titles = readme.sections(table)
    levels = prefix_bench.levels(args)
    assert set(titles) == {prefix_bench.section_title(*level, args) for level in levels}
    for level in levels:
        shown = {row[0] for row in titles[prefix_bench.section_title(*level, args)].rows}
        assert shown == set(args.front_ends), level
    for workload, load in {(w, load) for w, load, _ in levels}:
        runs = list((RESULTS / folder / "samples").glob(f"{workload}-{load}-*-seed*.csv.gz"))
        assert len(runs) == len(args.front_ends) * len(args.instances) * args.seeds


@pytest.mark.parametrize("folder", BATCHING)
def test_batching_command_parses_and_names_what_its_table_shows(folder: str) -> None:
    command = (RESULTS / folder / "command.txt").read_text().strip()
    args = recorded_args(command, batching_bench.PROG, batching_bench.parser())
    assert args.out == str(Path("loadtests/results") / folder)
    table = (RESULTS / folder / "table.md").read_text()
    header = table.splitlines()[0]
    assert f"Closed-loop clients {args.clients}" in header
    assert f"{args.duration_s:g} s per point, {args.seeds} seeds" in header
    assert f"batch size {args.batch_size}" in header
    assert f"max_batch_tokens {args.max_batch_tokens}" in header
    titles = readme.sections(table)
    for engine in args.engines:
        assert any(t.endswith(": tokens/s at equal P99") for t in titles), engine
    assert (RESULTS / folder / "samples.json.gz").exists()


@pytest.mark.parametrize("folder", BENCH)
def test_bench_command_names_what_its_table_shows(folder: str) -> None:
    command = (RESULTS / folder / "command.txt").read_text().strip()
    args = parse_command(command)
    plan = build_plan(args)  # no HAProxy filter: the command as recorded
    tables = readme.sections((RESULTS / folder / "table.md").read_text())
    p99 = tables["P99 end-to-end latency (s)"]
    shown = {h for h in p99.header[3:] if not h.endswith("[95% CI]")}
    assert set(plan.strategies) == shown
    assert args.strategies is not None, "the front ends are spelled out, not defaults"
    assert {(int(r[1]), int(r[2])) for r in p99.rows} == set(plan.scenarios)
    header = (RESULTS / folder / "table.md").read_text().splitlines()[0]
    expected = (
        f"{len(plan.seeds)} seeds x {plan.duration_s:.0f} s measured after "
        f"{plan.warmup_s:.0f} s warm-up"
    )
    assert expected in header
    assert ("open loop" in header) == bool(plan.utilization)
    if plan.utilization:
        assert f"Poisson arrivals at {plan.utilization:.0%} of" in header
    assert plan.out == Path("loadtests/results") / folder
    assert command == command_of(plan)  # the full form: every option that matters, explicit


@pytest.mark.parametrize("folder", JOBS)
def test_jobs_command_parses_and_matches_its_config(folder: str) -> None:
    command = (RESULTS / folder / "command.txt").read_text().strip()
    words = command.split()
    assert " ".join(words[:3]) == jobs_bench.PROG
    args = jobs_bench.parser().parse_args(words[3:])
    assert args.out == Path("loadtests/results") / folder
    assert command == jobs_bench.command_of(args)
    config = RESULTS / folder / "gateway.yaml"
    if config.exists():
        jobs = yaml.safe_load(config.read_text())["jobs"]
        assert jobs["max_outstanding_per_replica"] == args.threshold
    table = (RESULTS / folder / "table.md").read_text()
    assert f"{args.lines} lines of {args.job_tokens} tokens" in table
    assert f"{args.seconds:.0f} s real-time phase" in table
    (row,) = readme.sections(table)["Summary"].rows
    assert [row[0], row[2], row[3]] == [str(args.gateways), str(args.threshold), str(args.seeds)]
    assert row[1].startswith("PostgreSQL" if args.gateways > 1 else "SQLite")
    if args.gateways > 1:
        assert table.count("every gateway reports the same counts") == args.seeds


def test_a_plan_survives_its_own_command() -> None:
    args = parser().parse_args(
        ["--quick", "--open-loop", "0.85", "--gateways", "2", "--out", "x", "--seeds", "2"]
    )
    plan = build_plan(args)
    again = build_plan(parse_command(command_of(plan)))
    assert again == plan
    assert "--quick" not in command_of(plan)  # the defaults it stood for are spelled out
    with pytest.raises(ValueError, match="not an"):
        parse_command("infergate gateway -c g.yaml")


def test_front_ends_are_read_from_the_policy_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.routing.policies import POLICIES

    monkeypatch.setitem(POLICIES, "brand_new", POLICIES["random"])
    assert "brand_new" in known_front_ends() and set(HAPROXY) <= set(known_front_ends())
    args = parser().parse_args(["--strategies", "brand_new"])
    assert build_plan(args).strategies == ("random", "brand_new")
    assert PROG == "infergate bench"


def test_readme_result_blocks_are_what_the_generator_writes() -> None:
    text = (readme.ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- results:([^ ]+?)(?:#[^>]*)? -->", text)
    assert set(blocks) >= {
        "sagemaker-simulated-sigma0.5",
        "routing-a-sagemaker",
        "routing-b-two-gateways",
        "routing-c-slow-replica",
        "routing-d-open-loop-70",
        "routing-d-open-loop-85",
    }
    assert readme.render(text) == text, "README is stale: run python -m loadtests.readme"


def test_the_generator_replaces_a_stale_block() -> None:
    stale = "x\n<!-- results:routing-c-slow-replica -->\n| old | table |\n<!-- /results -->\ny\n"
    fresh = readme.render(stale)
    assert "| old | table |" not in fresh and "\n| peak_ewma | " in fresh
    assert fresh.startswith("x\n<!-- results:routing-c-slow-replica -->\n[`routing-c")
    assert fresh.endswith("<!-- /results -->\ny\n")
    assert readme.render(fresh) == fresh
