"""Raw per-request samples: the CSV columns every load generator writes, and the reader."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import IO

FIELDS = (
    "start_unix",
    "end_unix",
    "kind",
    "ok",
    "status",
    "latency_s",
    "ttft_s",
    "tokens",
    "replica",
)


@dataclass(frozen=True, slots=True)
class Sample:
    start_unix: float
    end_unix: float
    kind: str
    ok: bool
    status: int
    latency_s: float
    ttft_s: float | None
    tokens: int
    replica: str


def write_samples(path: str | Path, samples: list[Sample]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for s in samples:
            ttft = "" if s.ttft_s is None else s.ttft_s
            writer.writerow(
                [
                    s.start_unix,
                    s.end_unix,
                    s.kind,
                    int(s.ok),
                    s.status,
                    s.latency_s,
                    ttft,
                    s.tokens,
                    s.replica,
                ]
            )


def read_samples(path: Path) -> list[Sample]:
    with path.open(newline="") as f:
        return read_samples_from(f)


def read_samples_from(f: IO[str]) -> list[Sample]:
    return [
        Sample(
            start_unix=float(row["start_unix"]),
            end_unix=float(row["end_unix"]),
            kind=row["kind"],
            ok=row["ok"] == "1",
            status=int(row["status"]),
            latency_s=float(row["latency_s"]),
            ttft_s=float(row["ttft_s"]) if row["ttft_s"] else None,
            tokens=int(row["tokens"]),
            replica=row["replica"],
        )
        for row in csv.DictReader(f)
    ]
