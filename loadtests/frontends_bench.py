"""Front-end throughput benchmark: what each load balancer adds to a request, how many it relays
at saturation, and how many streamed events it relays, in front of the same no-op replicas,
in one run.

    python -m loadtests.frontends_bench [--repeats 3] [--seconds 10] [--front-ends ...]
        [--out loadtests/results/front-ends]
    python -m loadtests.frontends_bench --render loadtests/results/front-ends

Front ends, each with two replica URLs behind it: HAProxy `balance leastconn` (Debian's
haproxy, default threads); `vllm-router` and `sglang-router` with `power_of_two` (the `peers`
extra; Rust, multi-threaded); LiteLLM's proxy with `least-busy` (when `litellm` is installed);
infergate `least_outstanding_requests` with `workers: 1` and `workers: 2` (and, named
`infergate:workers=N+flow`, with flow control on: classes and token fairness, no contention, so
its cost alone). One that is not installed is skipped with a notice. `direct` (no front end)
is the baseline, and `ceiling:workers=2` the Python ceiling: a bare relay on uvloop + httptools
(loadtests/harness/ceiling.py: no routing, no limits, no metrics), as little as a Python front
end can do per request.

Request relay: the replicas are one nginx (Debian's, one worker process, two ports) returning a
fixed OpenAI completion; without nginx, the Python upstream of loadtests/harness/relay_rig.py
(said in the table). `POST /v1/completions`.
- Added latency at 1,000 req/s for `--seconds`, the front end's P50 and P99 minus direct's in
  the same repeat, from raw samples, two ways: open loop (relay_rig.py `rate`, timed from when
  each request was due) and `hey -c 10 -q 100` (hey's per-request CSV, 0.1 ms resolution; its
  workers fire together, so it sends bursts of 10, which a one-core front end serves in turn).
- Saturation: `wrk -t1 -c64` (keep-alive) for `--seconds` after a 2 s warm-up; req/s, and req/s
  per front-end CPU core (its processes' CPU time over the run, from psutil).

Streaming relay: the upstream of loadtests/harness/relay_rig.py streams completion chunks (one SSE
event each) at 40 events/s per stream; the rig's client holds C streams through the front end.
- Fixed load: 500 streams x 40 events/s = 20,000 events/s; each event's delay from the
  upstream's send to the client's receive (CLOCK_MONOTONIC, same machine), P50/P99 from raw
  samples, minus direct's.
- Saturation: 2,000 streams x 40 events/s = 80,000 events/s offered; events/s received, and per
  front-end CPU core.

Everything shares this machine's cores (load generator, replicas and front end), which the table
states; each repeat runs every front end in a rotated order, and the table gives the median
over repeats with the range [min, max].
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from loadtests.analysis.stats import percentile
from loadtests.harness.runner import (
    exit_on_sigterm,
    free_port_block,
    front_end_process,
    gateway_process,
    wait_http,
)

PROG = "python -m loadtests.frontends_bench"
FLOW_SUFFIX = "+flow"  # infergate:workers=N+flow: flow control on (its cost, no contention)
FLOW_CONTROL = {
    "classes": [{"name": "interactive"}, {"name": "standard"}],
    "default_class": "standard",
    "fairness": "tokens",
}
BODY = '{"model":"m","prompt":"Say hi","max_tokens":16}'
FRONT_ENDS = (
    "haproxy:leastconn",
    "vllm:power_of_two",
    "sglang:power_of_two",
    "litellm:least-busy",
    "infergate:workers=1",
    "infergate:workers=2",
    "ceiling:workers=2",
)
DIRECT = "direct"
STREAM_RATE = 40  # events per second per stream
STREAM_EVENTS = 200  # per stream: 5 s each
FIXED_STREAMS = 500  # x 40/s = 20,000 events/s
SATURATION_STREAMS = 2000  # x 40/s = 80,000 events/s offered


# -- replicas -------------------------------------------------------------------------------

NGINX_CONFIG = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port0};
        listen 127.0.0.1:{port1};
        location = /health {{ return 200 "ok"; }}
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_replicas(base: int, workdir: Path, log: IO[bytes]) -> Iterator[list[str]]:
    from loadtests.harness.relay_rig import FIXED

    path = workdir / "nginx.conf"
    path.write_text(
        NGINX_CONFIG.format(dir=workdir, port0=base, port1=base + 1, body=FIXED.decode())
    )
    proc = subprocess.Popen(["nginx", "-c", str(path), "-p", str(workdir)], stdout=log, stderr=log)
    try:
        urls = [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        for url in urls:
            wait_http(f"{url}/health")
        yield urls
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def rig_replicas(base: int, log: IO[bytes]) -> Iterator[list[str]]:
    """Two relay_rig upstreams (they also answer plain requests with the fixed completion)."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loadtests.harness.relay_rig",
                "upstream",
                "--port",
                str(port),
                "--events-per-s",
                str(STREAM_RATE),
                "--events",
                str(STREAM_EVENTS),
            ],
            stdout=log,
            stderr=log,
        )
        for port in (base, base + 1)
    ]
    try:
        urls = [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        for url in urls:
            wait_http(f"{url}/health")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


# -- front ends -----------------------------------------------------------------------------

HAPROXY_CONFIG = """\
global
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    option http-keep-alive
frontend bench
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance leastconn
{servers}
"""

LITELLM_CONFIG = """\
model_list:
{models}
router_settings:
  routing_strategy: least-busy
general_settings: {{}}
"""


def _script(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def missing(name: str) -> str | None:
    """Why `name` cannot run here, or None."""
    kind, _, option = name.partition(":")
    known = {
        "haproxy": option == "leastconn",
        "vllm": bool(option),
        "sglang": bool(option),
        "litellm": option == "least-busy",
        "infergate": option.startswith("workers=")
        and option[8:].removesuffix(FLOW_SUFFIX).isdigit(),
        "ceiling": option.startswith("workers=") and option[8:].isdigit(),
    }
    if not known.get(kind, False):
        return (
            f"unknown front end {name} (haproxy:leastconn, vllm:POLICY, sglang:POLICY, "
            "litellm:least-busy, infergate:workers=N, infergate:workers=N+flow, "
            "ceiling:workers=N)"
        )
    need = {
        "haproxy": ("haproxy", "apt-get install haproxy"),
        "vllm": ("vllm-router", "pip install -e '.[peers]'"),
        "sglang": ("sglang-router", "pip install -e '.[peers]'"),
        "litellm": ("litellm", "pip install 'litellm[proxy]'"),
    }.get(name.split(":", maxsplit=1)[0])
    if need is None or _script(need[0]):
        return None
    return f"{need[0]} is not installed ({need[1]})"


@contextlib.contextmanager
def front_end(
    name: str, urls: list[str], port: int, workdir: Path, log: IO[bytes]
) -> Iterator[tuple[str, int]]:
    """(URL, pid) of the front end once it answers; `direct` is the first replica itself."""
    kind = name.split(":", maxsplit=1)[0]
    if name == DIRECT:
        yield urls[0], 0
    elif kind == "haproxy":
        servers = "\n".join(
            f"    server r{i} {url.removeprefix('http://')}" for i, url in enumerate(urls)
        )
        path = workdir / f"haproxy-{port}.cfg"
        path.write_text(HAPROXY_CONFIG.format(port=port, servers=servers))
        with front_end_process(["haproxy", "-db", "-f", str(path)], port, "/health", log) as f:
            yield f
    elif kind in ("vllm", "sglang"):
        script = _script(f"{kind}-router")
        assert script is not None
        cmd = [script, *(["launch"] if kind == "sglang" else [])]
        cmd += [
            "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
            "--policy", name.split(":")[1], "--prometheus-port", str(port + 1),
            "--log-level", "warn" if kind == "sglang" else "warning",
        ]  # fmt: skip
        if kind == "sglang":
            cmd += ["--prometheus-host", "127.0.0.1"]
        with front_end_process(cmd, port, "/readiness", log) as f:
            yield f
    elif kind == "litellm":
        models = "\n".join(
            f"  - model_name: m\n    litellm_params:\n      model: openai/m\n"
            f"      api_base: {url}/v1\n      api_key: none"
            for url in urls
        )
        path = workdir / "litellm.yaml"
        path.write_text(LITELLM_CONFIG.format(models=models))
        script = _script("litellm")
        assert script is not None
        cmd = [script, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
        with front_end_process(cmd, port, "/health/liveliness", log) as f:
            yield f
    elif kind == "ceiling":
        cmd = [sys.executable, "-m", "loadtests.harness.ceiling", "--port", str(port)]
        cmd += ["--workers", name.split("=")[1], *urls]
        with front_end_process(cmd, port, "/health", log) as f:
            yield f
    else:
        option = name.split("=")[1]
        workers = int(option.removesuffix(FLOW_SUFFIX))
        extra: dict[str, Any] = {"workers": workers, "limits": {"max_outstanding": 100000}}
        if option.endswith(FLOW_SUFFIX):  # flow control on, with nothing to queue for
            extra["flow_control"] = FLOW_CONTROL
        with gateway_process(urls, "least_outstanding_requests", 0, port, workdir, log, extra) as f:
            yield f


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its children so far (0 for no process)."""
    if not pid:
        return 0.0
    total = 0.0
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                total += times.user + times.system
    return total


# -- measurements ---------------------------------------------------------------------------


def open_loop_latency(url: str, seconds: float, workdir: Path) -> dict[str, Any]:
    """Latency at 1,000 req/s, open loop: loadtests/harness/relay_rig.py's fixed-rate client."""
    out = workdir / "rate.json"
    subprocess.run(
        [
            sys.executable, "-m", "loadtests.harness.relay_rig", "rate", "--url", url,
            "--rate", "1000", "--seconds", str(seconds), "--body", BODY, "--out", str(out),
        ],
        check=True, timeout=seconds + 60,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def hey_latency(url: str, seconds: float) -> dict[str, float]:
    """Latency at 1,000 req/s: hey, 10 workers at 100 req/s each, per-request CSV."""
    out = subprocess.run(
        [
            "hey", "-z", f"{seconds:g}s", "-c", "10", "-q", "100", "-m", "POST",
            "-T", "application/json", "-d", BODY, "-o", "csv", f"{url}/v1/completions",
        ],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(out)))
    ok = [float(r["response-time"]) * 1e3 for r in rows if r["status-code"] == "200"]
    return {
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "requests": len(rows),
        "errors": len(rows) - len(ok),
    }


WRK_POST = (
    'wrk.method = "POST"\nwrk.body = \'{body}\'\nwrk.headers["Content-Type"] = "application/json"\n'
)


def wrk_rate(
    url: str, seconds: float, script: Path, pid: int, warmup_s: float = 2.0
) -> dict[str, float]:
    cmd = ["wrk", "-t1", "-c64", "-s", str(script)]
    warm = f"-d{max(1, round(min(2.0, warmup_s)))}s"
    subprocess.run([*cmd, warm, f"{url}/v1/completions"], capture_output=True, check=True)
    before, started = cpu_seconds(pid), time.monotonic()
    out = subprocess.run(
        [*cmd, f"-d{round(seconds)}s", f"{url}/v1/completions"],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    cores = (cpu_seconds(pid) - before) / (time.monotonic() - started)
    rate = _wrk_field(out, r"Requests/sec:\s+([\d.]+)")
    non2xx = _wrk_field(out, r"Non-2xx or 3xx responses: (\d+)")
    errors = _wrk_field(out, r"Socket errors: .*?(\d+) timeout")
    return {
        "req_per_s": rate,
        "cores": cores,
        "req_per_core_s": rate / cores if cores > 0 else float("nan"),
        "non2xx": non2xx,
        "timeouts": errors,
    }


def _wrk_field(out: str, pattern: str) -> float:
    import re

    match = re.search(pattern, out)
    return float(match.group(1)) if match else 0.0


def stream_run(
    url: str, streams: int, seconds: float, pid: int, workdir: Path, warmup: float = 3.0
) -> dict[str, Any]:
    out = workdir / "stream.json"
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "loadtests.harness.relay_rig", "client", "--url", url,
            "--streams", str(streams), "--warmup-s", str(warmup), "--seconds", str(seconds),
            "--events", str(STREAM_EVENTS), "--out", str(out),
        ]
    )  # fmt: skip
    time.sleep(warmup)
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cores = (cpu_seconds(pid) - before) / (time.monotonic() - started)
    proc.wait(seconds + STREAM_EVENTS / STREAM_RATE + 60)
    result: dict[str, Any] = json.loads(out.read_text())
    result["cores"] = cores
    result["events_per_core_s"] = result["events_per_s"] / cores if cores > 0 else float("nan")
    return result


@dataclass
class Rig:
    workdir: Path
    log: IO[bytes]
    seconds: float
    port: int
    nginx: bool
    warmup_s: float = 3.0  # streams' warm-up; wrk's is 2 s, or this when shorter
    streams: tuple[int, int] = (FIXED_STREAMS, SATURATION_STREAMS)


def measure(rig: Rig, name: str, repeat: int) -> list[dict[str, Any]]:
    """Every measurement of one front end in one repeat, fresh processes for each part."""
    rows: list[dict[str, Any]] = []
    script = rig.workdir / "post.lua"
    script.write_text(WRK_POST.format(body=BODY))
    base = {"front_end": name, "repeat": repeat}
    replicas = (
        nginx_replicas(rig.port, rig.workdir, rig.log)
        if rig.nginx
        else rig_replicas(rig.port, rig.log)
    )
    with replicas as urls, front_end(name, urls, rig.port + 10, rig.workdir, rig.log) as (url, pid):
        rows.append(
            {**base, "scenario": "latency", **open_loop_latency(url, rig.seconds, rig.workdir)}
        )
        rows.append({**base, "scenario": "hey", **hey_latency(url, rig.seconds)})
        rate = wrk_rate(url, rig.seconds, script, pid, rig.warmup_s)
        rows.append({**base, "scenario": "saturation", **rate})
    with (
        rig_replicas(rig.port + 2, rig.log) as urls,
        front_end(name, urls, rig.port + 20, rig.workdir, rig.log) as (url, pid),
    ):
        for scenario, streams in (
            ("stream_fixed", rig.streams[0]),
            ("stream_saturation", rig.streams[1]),
        ):
            result = stream_run(url, streams, rig.seconds, pid, rig.workdir, rig.warmup_s)
            rows.append({**base, "scenario": scenario, "streams": streams, **result})
    for row in rows:
        print(f"  {json.dumps(row)}", flush=True)
    return rows


# -- the table ------------------------------------------------------------------------------


def _median_range(values: list[float], fmt: str) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mid = statistics.median(values)
    if len(values) == 1:
        return format(mid, fmt)
    return f"{format(mid, fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def _latency_cells(
    name: str,
    scenario: str,
    fmt: str,
    rows_of: Callable[[str, str], list[dict[str, Any]]],
    added: Callable[[str, str, str], list[float]],
) -> list[str]:
    """P50 and P99: the replica's own on the direct row, added by the front end elsewhere."""
    if name == DIRECT:
        return [
            f"{key[:3]} " + _median_range([r[key] for r in rows_of(name, scenario)], fmt)
            for key in ("p50_ms", "p99_ms")
        ]
    return [_median_range(added(name, scenario, key), "+" + fmt) for key in ("p50_ms", "p99_ms")]


def render(out: Path) -> str:
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line]
    meta = json.loads((out / "meta.json").read_text())
    names = [DIRECT, *[n for n in meta["front_ends"] if n != DIRECT]]
    fixed, saturation = meta.get("streams", (FIXED_STREAMS, SATURATION_STREAMS))

    def rows_of(name: str, scenario: str) -> list[dict[str, Any]]:
        return [r for r in runs if r["front_end"] == name and r["scenario"] == scenario]

    def added(name: str, scenario: str, key: str) -> list[float]:
        """Per repeat: the front end's value minus direct's in the same repeat."""
        direct = {r["repeat"]: r[key] for r in rows_of(DIRECT, scenario)}
        return [
            r[key] - direct[r["repeat"]] for r in rows_of(name, scenario) if r["repeat"] in direct
        ]

    lines = [
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Load generator, replicas and front end share its cores. "
        f"Replicas for the request relay: {meta['replica']}. {meta['repeats']} repeats of "
        f"{meta['seconds']:g} s each; median [min, max] over repeats.",
        "",
        "### Request relay",
        "",
        "| front end | added p50 (ms) | added p99 (ms) | hey: added p50 (ms) | hey: added p99 (ms) "
        "| saturated req/s | front-end cores used | req/s per front-end core |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        sat = rows_of(name, "saturation")
        if not sat:
            continue
        latency = [
            cell
            for scenario, fmt in (("latency", ".2f"), ("hey", ".1f"))
            for cell in _latency_cells(name, scenario, fmt, rows_of, added)
        ]
        if name == DIRECT:
            cores, per_core = "-", "-"
        else:
            cores = _median_range([r["cores"] for r in sat], ".2f")
            per_core = _median_range([r["req_per_core_s"] for r in sat], ",.0f")
        rate = _median_range([r["req_per_s"] for r in sat], ",.0f")
        lines.append(f"| {name} | {' | '.join(latency)} | {rate} | {cores} | {per_core} |")
    lines += [
        "",
        "Latency at 1,000 req/s, the front end's minus direct's in the same repeat (the direct "
        "row gives the replica's own): first open loop (loadtests/harness/relay_rig.py `rate`: "
        "request i due at i/1000 s, timed from when it was due), then `hey -c 10 -q 100` (0.1 ms "
        "resolution; its 10 workers fire together, so requests come in bursts of 10 every "
        "10 ms). Saturation: `wrk -t1 -c64`, keep-alive.",
        "",
        "### Streaming relay",
        "",
        f"| front end | added delay p50 (ms) at {fixed * STREAM_RATE:,} events/s | added "
        f"delay p99 (ms) | events/s with {saturation * STREAM_RATE:,} offered | "
        "front-end cores used | events/s per front-end core |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        sat = rows_of(name, "stream_saturation")
        if not sat:
            continue
        if name == DIRECT:
            fixed = rows_of(name, "stream_fixed")
            p50 = "p50 " + _median_range([r["delay_p50_ms"] for r in fixed], ".2f")
            p99 = "p99 " + _median_range([r["delay_p99_ms"] for r in fixed], ".2f")
            cores, per_core = "-", "-"
        else:
            p50 = _median_range(added(name, "stream_fixed", "delay_p50_ms"), "+.2f")
            p99 = _median_range(added(name, "stream_fixed", "delay_p99_ms"), "+.2f")
            cores = _median_range([r["cores"] for r in sat], ".2f")
            per_core = _median_range([r["events_per_core_s"] for r in sat], ",.0f")
        rate = _median_range([r["events_per_s"] for r in sat], ",.0f")
        lines.append(f"| {name} | {p50} | {p99} | {rate} | {cores} | {per_core} |")
    lines += [
        "",
        f"Streams of {STREAM_EVENTS} completion chunks at {STREAM_RATE} events/s each from "
        "loadtests/harness/relay_rig.py; delay is the upstream's send to the client's receive of "
        "each event. The direct row gives the rig's own.",
    ]
    if meta.get("skipped"):
        lines += ["", "Not run: " + "; ".join(meta["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--front-ends", default=",".join(FRONT_ENDS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup-s", type=float, default=3.0, help="before each stream run")
    parser.add_argument(
        "--streams", default=f"{FIXED_STREAMS},{SATURATION_STREAMS}",
        help="streams held at fixed load and at saturation",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/front-ends"))
    parser.add_argument("--render", type=Path, help="rebuild table.md of a result folder")
    args = parser.parse_args(argv)
    if args.render:
        (args.render / "table.md").write_text(render(args.render))
        print(render(args.render))
        return 0
    exit_on_sigterm()
    for tool in ("hey", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed (apt-get install {tool})", file=sys.stderr)
            return 2
    names, skipped = [DIRECT], []
    for name in args.front_ends.split(","):
        why = missing(name)
        if why:
            print(f"notice: skipping {name}: {why}", flush=True)
            skipped.append(f"{name} ({why})")
        else:
            names.append(name)
    nginx = shutil.which("nginx") is not None
    if not nginx:
        print("notice: nginx is not installed; the Python rig upstream serves the request relay")
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])
    meta = {
        "command": command,
        "machine": machine(),
        "replica": "nginx " + _nginx_version() + ", 1 worker process" if nginx else "relay_rig",
        "repeats": args.repeats,
        "seconds": args.seconds,
        "streams": [int(n) for n in args.streams.split(",")],
        "front_ends": names,
        "skipped": skipped,
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    (args.out / "command.txt").write_text(command + "\n")
    runs = args.out / "runs.jsonl"
    runs.write_text("")
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "processes.log").open("wb") as log:
        fixed, saturation = (int(n) for n in args.streams.split(","))
        rig = Rig(
            Path(tmp), log, args.seconds, free_port_block(40), nginx, args.warmup_s,
            (fixed, saturation),
        )  # fmt: skip
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                print(f"repeat {repeat + 1}/{args.repeats}: {name}", flush=True)
                with runs.open("a") as f:
                    for row in measure(rig, name, repeat):
                        f.write(json.dumps(row) + "\n")
    table = render(args.out)
    (args.out / "table.md").write_text(table)
    print(table)
    return 0


def _nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr
    return out.strip().split("/")[-1]


if __name__ == "__main__":
    sys.exit(main())
