"""README's result tables, generated from the committed result folders so they cannot drift:

    python -m loadtests.readme            # rewrite every generated block of README.md
    python -m loadtests.readme --check    # exit 1 if a block differs from what it would write

A block sits between two marker comments and is replaced whole:

    <!-- results:FOLDER -->            a digest of loadtests/results/FOLDER/table.md: the
    <!-- /results -->                  command, then per strategy each scenario's P99, throughput
                                       per instance and P99 time to first token, and the
                                       simulated central queue's P99
    <!-- results:FOLDER#SECTION -->    the table of one `### SECTION` of that table.md, verbatim;
    <!-- /results -->                  FOLDER may be A+B+C: their rows under A's header
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("loadtests/results")  # relative to the repository root, as README links it
BLOCK = re.compile(r"(<!-- results:([^#\s]+)(?:#([^>]+?))? -->\n)(.*?)(<!-- /results -->)", re.S)
CENTRAL_QUEUE_BOUND = "Simulated central queue P99 (s)"
LOAD = "Offered load and measured capacity"


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    lines: list[str]  # as written

    def column(self, name: str) -> int:
        return next(i for i, h in enumerate(self.header) if h.startswith(name))


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def sections(text: str) -> dict[str, Table]:
    """Each `### title` of a table.md and the first markdown table under it."""
    found: dict[str, Table] = {}
    title = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("### "):
            title = line[4:].strip()
        elif line.startswith("|") and title and title not in found:
            block = [line]
            for more in lines[i + 1 :]:
                if not more.startswith("|"):
                    break
                block.append(more)
            found[title] = Table(cells(block[0]), [cells(b) for b in block[2:]], block)
    return found


def digest(folder: Path) -> str:
    """Per strategy, each scenario's P99, throughput and P99 TTFT; then the simulated bound."""
    tables = sections((ROOT / folder / "table.md").read_text())
    detail, throughput = tables["Detail"], tables["Throughput per minute per instance"]
    users, instances, strategy = (detail.column(c) for c in ("Users", "Instances", "Strategy"))
    scenarios = list(dict.fromkeys((r[users], r[instances]) for r in detail.rows))
    strategies = [h for h in throughput.header[3:] if not h.endswith("[95% CI]")]
    by_key = {(r[users], r[instances], r[strategy]): r for r in detail.rows}
    per_minute = {
        (r[1], r[2]): dict(zip(throughput.header, r, strict=False)) for r in throughput.rows
    }
    names = [f"{u}/{n}" for u, n in scenarios]
    header = [
        "Strategy",
        *(f"P99 (s) {s}" for s in names),
        *(f"req/min/instance {s}" for s in names),
        *(f"P99 TTFT (s) {s}" for s in names),
    ]
    p99, ttft = detail.column("P99 (s)"), detail.column("P99 TTFT (s)")
    rows = [
        [
            name,
            *(by_key[(u, n, name)][p99] for u, n in scenarios),
            *(per_minute[(u, n)][name] for u, n in scenarios),
            *(by_key[(u, n, name)][ttft] for u, n in scenarios),
        ]
        for name in strategies
    ]
    bound = tables.get("Against the ideal and HAProxy")
    if bound is not None:
        column = bound.column(CENTRAL_QUEUE_BOUND)
        simulated = {(r[0], r[1]): r[column] for r in bound.rows}
        blank = [""] * (2 * len(scenarios))
        rows.append(["simulated central queue", *(simulated[s] for s in scenarios), *blank])
    command = (ROOT / folder / "command.txt").read_text().strip()
    lines = [
        f"[`{folder.name}`]({folder.as_posix()}/table.md): `{command}`",
        "",
        *load_lines(tables.get(LOAD)),
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def load_lines(load: Table | None) -> list[str]:
    """What each scenario was offered against its measured capacity (folders from before
    capacity was measured have no such section)."""
    if load is None:
        return []
    out = []
    for row in load.rows:
        values = dict(zip(load.header, row, strict=True))
        target = values["Target rate (req/s)"]
        out.append(
            f"{values['Users']}/{values['Instances']}: {values['Arrivals']}"
            + (f" at {target} req/s" if target != "-" else "")
            + f"; measured capacity {values['Measured capacity (req/s)']} req/s"
            + f" (the model's: {values['Simulated capacity (req/s)']})."
        )
    return [" ".join(out), ""]


def section(folders: str, title: str) -> str:
    """The table of one `### title`; of several folders joined by '+', their rows in that order
    under the first one's header."""
    tables = [
        sections((ROOT / RESULTS / name / "table.md").read_text())[title]
        for name in folders.split("+")
    ]
    lines = tables[0].lines[:2] + [line for table in tables for line in table.lines[2:]]
    return "\n".join(lines) + "\n"


def render(readme: str) -> str:
    """README with every generated block rewritten from the result files."""

    def block(match: re.Match[str]) -> str:
        body = section(match[2], match[3].strip()) if match[3] else digest(RESULTS / match[2])
        return f"{match[1]}{body}{match[5]}"

    return BLOCK.sub(block, readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.readme", description=__doc__)
    p.add_argument("--check", action="store_true", help="only report whether README is current")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    current = args.readme.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(
                f"{args.readme}: generated result blocks are stale; run python -m loadtests.readme"
            )
            return 1
        return 0
    args.readme.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
