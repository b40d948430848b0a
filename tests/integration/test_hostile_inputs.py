"""Hostile input to every endpoint of a real replica and a real gateway in front of it (issue
30): JSON nested 20,000 deep (whole body and inside a valid field), bodies over the limits,
non-UTF-8 bytes in body, query, path and headers, control characters and NUL, lone surrogates,
1e999 and 5,000-digit numbers, wrong types (tests/support/hostile.py lists them all).

Every answer must be in time and below 500 (and an inference endpoint must refuse what is not
a valid request); what the jobs API stored from them must read back without a 5xx; both
processes must still serve, log no traceback and no secret, and the gateway's outstanding
counts must be back at zero. The failure message lists each (endpoint, input, status, body)
that broke the rule, so it is the report to act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from loadtests.fuzz import fast_profile, replica_config
from tests.support import hostile
from tests.support.hostile import Answer, Endpoint, Outcome, Report, Request
from tests.support.processes import free_port, stop, wait_http_ok

HOST = "127.0.0.1"
BODY_LIMIT = 1_000_000  # both processes: hostile.HUGE_BYTES is over it
SETTLE_S = 20.0  # jobs the run created finish (or fail) within this
CONCURRENCY = 4


@dataclass
class Fleet:
    replica: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    ports: dict[str, int]
    logs: dict[str, Path]


def gateway_config(port: int, replica_port: int, workdir: Path) -> dict[str, object]:
    return {
        "listen": {"port": port},
        "replicas": [{"url": f"http://{HOST}:{replica_port}"}],
        "reload": {"watch": False},
        "limits": {"max_body_bytes": BODY_LIMIT},
        # precise_prefix reads prompts and X-Session-Id and polls /cache/blocks; the classifier
        # routes by affinity (a key from the header or the prompt): both parsers meet the input.
        "routing": {"strategy": "precise_prefix", "prefix": {"poll_interval_s": 0.2}},
        "models": [{"name": "classifier", "strategy": "affinity"}],
        "health_check": {"interval_s": 0.5},
        "auth": {"api_keys": [{"name": "fuzz", "key": hostile.API_KEY}]},
        "jobs": {
            "store": str(workdir / "jobs.db"),
            "max_batch_bytes": BODY_LIMIT,
            "poll_interval_s": 0.01,
        },
    }


@contextlib.asynccontextmanager
async def fleet(workdir: Path) -> AsyncIterator[Fleet]:
    ports = {"replica": free_port(), "gateway": free_port()}
    logs = {name: workdir / f"{name}.log" for name in ports}
    (workdir / "replica.yaml").write_text(
        yaml.safe_dump(replica_config(fast_profile(workdir / "profile.yaml"), ports["replica"]))
    )
    config = gateway_config(ports["gateway"], ports["replica"], workdir)
    (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "INFERGATE_ADMIN_TOKEN": hostile.ADMIN_TOKEN}
    with logs["replica"].open("wb") as rlog, logs["gateway"].open("wb") as glog:
        replica = subprocess.Popen(
            [sys.executable, "-m", "replica", "-c", str(workdir / "replica.yaml")],
            stdout=rlog, stderr=subprocess.STDOUT,
        )  # fmt: skip
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "-c", str(workdir / "gateway.yaml")],
            stdout=glog, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        await wait_http_ok(f"http://{HOST}:{ports['replica']}/ping", replica, timeout_s=60)
        await wait_http_ok(f"http://{HOST}:{ports['gateway']}/readyz", gateway, timeout_s=30)
        yield Fleet(replica, gateway, ports, logs)
    finally:
        stop(gateway)
        stop(replica)


async def call(fleet: Fleet, target: str, request: Request) -> Answer:
    return await hostile.send(HOST, fleet.ports[target], request, hostile.ANSWER_TIMEOUT_S)


def plain(method: str, path: str, auth: hostile.Auth = "key", body: bytes = b"") -> Request:
    headers = (*hostile.auth_header(auth), (b"Content-Type", b"application/json"))
    return Request(method.encode(), path.encode(), headers, body)


async def create(fleet: Fleet, path: str, body: bytes) -> str:
    """The id of a job or batch the gateway accepted: the {job} and {batch} the run aims at."""
    answer = await call(fleet, "gateway", plain("POST", path, body=body))
    assert answer.status is not None and answer.status < 300, answer
    ident: str = answer.json()["id"]
    return ident


async def hostile_run(fleet: Fleet) -> tuple[list[Outcome], set[str], set[str]]:
    """Every case against every endpoint; the outcomes, and the jobs and batches created."""
    job = await create(fleet, "/v1/jobs", hostile.encode(hostile.JOB))
    batch = await create(fleet, "/v1/batches", hostile.encode(hostile.JOB))
    work = [
        (endpoint, case, request)
        for endpoint in hostile.endpoints(job, batch)
        for case, request in hostile.requests_for(endpoint)
    ]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(endpoint: Endpoint, case: hostile.Case, request: Request) -> Outcome:
        async with gate:
            answer = await call(fleet, endpoint.target, request)
        return Outcome(endpoint, case.name, answer, hostile.judge(endpoint, case, answer))

    outcomes = await asyncio.gather(*(one(*item) for item in work))
    jobs, batches = {job}, {batch}
    for outcome in outcomes:
        ident = _created(outcome)
        if ident is not None:
            (jobs if outcome.endpoint.path == "/v1/jobs" else batches).add(ident)
    return outcomes, jobs, batches


def _created(outcome: Outcome) -> str | None:
    endpoint, answer = outcome.endpoint, outcome.answer
    if endpoint.target != "gateway" or endpoint.method != "POST":
        return None
    if endpoint.path not in ("/v1/jobs", "/v1/batches") or answer.status not in (200, 202):
        return None
    value = answer.json()
    return value.get("id") if isinstance(value, dict) else None


async def read_back(fleet: Fleet, jobs: set[str], batches: set[str]) -> list[Outcome]:
    """What the jobs API stored from hostile input, once it has run: each job, each batch and
    its results, and the listings, must read back without a 5xx."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S
    pending = {f"/v1/jobs/{j}" for j in jobs} | {f"/v1/batches/{b}" for b in batches}
    last: dict[str, Answer] = {}
    while pending and loop.time() < deadline:
        for path in sorted(pending):
            last[path] = answer = await call(fleet, "gateway", plain("GET", path))
            value = answer.json() if answer.status == 200 else None
            settled = not isinstance(value, dict) or value.get("status") not in (
                "queued", "running", "in_progress", "validating", "finalizing",
            )  # fmt: skip
            if settled:
                pending.discard(path)
        if pending:
            await asyncio.sleep(0.1)
    paths = sorted(last) + [f"/v1/batches/{b}/results" for b in sorted(batches)]
    paths += ["/v1/jobs?limit=1000", "/v1/batches?limit=1000"]
    outcomes = []
    for path in paths:
        answer = last.get(path) or await call(fleet, "gateway", plain("GET", path))
        endpoint = Endpoint("gateway", "GET", path)
        case = "read back after the run" + (" (still unfinished)" if path in pending else "")
        broken = "5xx" if answer.status is None or answer.status >= 500 else ""
        if path in pending:
            broken = broken or f"not finished in {SETTLE_S:.0f} s"
        outcomes.append(Outcome(endpoint, case, answer, broken))
    return outcomes


async def after_checks(fleet: Fleet) -> list[str]:
    """Both processes alive and serving, and every outstanding count back at zero."""
    problems = []
    for name, proc in (("replica", fleet.replica), ("gateway", fleet.gateway)):
        if proc.poll() is not None:
            problems.append(f"{name} exited with {proc.returncode} during the run")
    if problems:
        return problems
    completion = plain("POST", "/v1/completions", body=hostile.encode(hostile.COMPLETION))
    for target in ("replica", "gateway"):
        answer = await call(fleet, target, completion)
        if answer.status != 200:
            problems.append(f"{target} no longer serves a valid completion: {answer}")
    replicas = await _replicas_at_rest(fleet)
    for replica in replicas:
        if replica.get("outstanding") or replica.get("outstanding_tokens"):
            problems.append(f"outstanding not back at zero: {replica}")
        if replica.get("ejected") or not replica.get("healthy"):
            problems.append(f"replica out of rotation after the run: {replica}")
    if not replicas:
        problems.append("/admin/replicas listed no replica")
    return problems


async def _replicas_at_rest(fleet: Fleet) -> list[dict[str, object]]:
    """/admin/replicas once nothing is outstanding (requests still finishing have 5 s)."""
    replicas: list[dict[str, object]] = []
    for _ in range(50):
        answer = await call(fleet, "gateway", plain("GET", "/admin/replicas", auth="admin"))
        value = answer.json()
        replicas = value.get("replicas", []) if isinstance(value, dict) else []
        if replicas and not any(r.get("outstanding") for r in replicas):
            break
        await asyncio.sleep(0.1)
    return replicas


RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d |^replica listening")
OUR_FRAME = re.compile(r'File ".*/(gateway|replica)/[^"]*", line \d+, in \w+')
CHAIN = ("Traceback (most recent", "During handling of", "The above exception")


def log_problems(name: str, text: str) -> list[str]:
    """Each kind of logged traceback once (what logged it, the last exception of the chain and
    the deepest frame in our code, with a count), and any secret found in the log."""
    records: list[list[str]] = [[]]
    for line in text.splitlines():
        if RECORD_START.match(line):
            records.append([])
        records[-1].append(line)
    kinds: dict[str, list[str]] = {}  # kind -> what logged each
    for record in records:
        if not any(line.startswith("Traceback") for line in record):
            continue
        logged = re.sub(r"^\S+ \S+ ", "", record[0])[:80] if RECORD_START.match(record[0]) else ""
        errors = [
            line
            for line in record[1:]
            if line and not line[0].isspace() and not line.startswith(CHAIN)
        ]
        frames = [m.group(0) for line in record if (m := OUR_FRAME.search(line))]
        where = frames[-1] if frames else "no frame in our code"
        error = (errors[-1] if errors else "?")[:160]
        kinds.setdefault(f"{name} log: traceback: {error} | at {where}", []).append(logged)
    problems = [f"{kind} (x{len(by)}, first: {by[0]})" for kind, by in sorted(kinds.items())]
    for secret in (hostile.API_KEY, hostile.ADMIN_TOKEN):
        if secret in text:
            problems.append(f"{name} log: holds a secret ({secret[:8]}...)")
    return problems


async def run(workdir: Path) -> Report:
    report = Report()
    async with fleet(workdir) as f:
        outcomes, jobs, batches = await hostile_run(f)
        report.outcomes += outcomes
        report.outcomes += await read_back(f, jobs, batches)
        report.problems += await after_checks(f)
        codes = {"gateway": stop(f.gateway), "replica": stop(f.replica)}
    report.problems += [f"{n} exited with {c} on SIGTERM" for n, c in codes.items() if c != 0]
    for name, path in f.logs.items():
        report.problems += log_problems(name, path.read_text(errors="replace"))
    return report


async def test_hostile_input_to_every_endpoint_gets_a_4xx_and_leaves_both_processes_well(
    tmp_path: Path,
) -> None:
    report = await run(tmp_path)
    assert len(report.outcomes) > 1000  # every endpoint met every case that applies to it
    if report.broken or report.problems:
        pytest.fail(report.text(), pytrace=False)
