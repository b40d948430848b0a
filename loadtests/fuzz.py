"""Fuzz the HTTP APIs from their own OpenAPI documents with schemathesis: a replica (simulated
engine, a fast timing profile) and a gateway in front of it, each a real process on loopback.
Fails on any 5xx caused by input, a response slower than --max-response-time (a hang), or a
process that dies.

    .venv/bin/python -m loadtests.fuzz [--examples 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from loadtests.harness.runner import free_port_block, wait_http

TOKEN = "fuzz"


def fast_profile(path: Path) -> Path:
    from replica.engines.profile import load_profile

    profile = load_profile().model_dump()
    for section in ("generation", "classifier"):
        for key, value in profile[section].items():
            if key.endswith("_s") and isinstance(value, float):
                profile[section][key] = value / 100
    path.write_text(yaml.safe_dump(profile))
    return path


def replica_config(profile: Path, port: int) -> dict[str, object]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "max_body_bytes": 1_000_000},
        "engine": {"kind": "simulated", "profile_path": str(profile)},
        "models": [
            {"kind": "tiny-gpt", "max_tokens_limit": 64, "params": {"context_len": 512}},
            {
                "kind": "classifier",
                "params": {"input_size": 16, "hidden_sizes": [16], "num_classes": 4},
            },
        ],
    }


def schemathesis(
    schema_url: str, examples: int, report: Path, headers: list[str], base_url: str | None = None
) -> int:
    """Run schemathesis on the document at schema_url, against base_url (default: the same)."""
    binary = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    options = {
        "--checks": "not_a_server_error",
        "--max-examples": str(examples),
        # One worker: schemathesis's workers are threads, and CPython 3.11 can fail parsing
        # source in two threads at once ("AST constructor recursion depth mismatch",
        # python/cpython#106905), which fails the run with a schemathesis-internal error.
        "--workers": "1",
        "--seed": "1",
        "--request-timeout": "20",
        "--max-response-time": "15",  # a hang fails the check
        "--suppress-health-check": "all",
        "--report": "junit",
        "--report-dir": str(report),
    }
    cmd = [binary, "run", f"{schema_url}/openapi.json", "--no-color"]
    cmd += [part for pair in options.items() for part in pair]
    for header in headers:
        cmd += ["--header", header]
    if base_url is not None:
        cmd += ["--url", base_url]
    return subprocess.run(cmd, check=False, timeout=900).returncode


def run(examples: int, workdir: Path) -> dict[str, int]:
    base = free_port_block(2, start=27000)
    replica_url, gateway_url = f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"
    (workdir / "replica.yaml").write_text(
        yaml.safe_dump(replica_config(fast_profile(workdir / "profile.yaml"), base))
    )
    gateway = {
        "listen": {"port": base + 1},
        "replicas": [{"url": replica_url}],
        "reload": {"watch": False},
        "jobs": {"store": str(workdir / "jobs.db")},
    }
    (workdir / "gateway.yaml").write_text(yaml.safe_dump(gateway))
    log = (workdir / "processes.log").open("wb")
    env = {**os.environ, "INFERGATE_ADMIN_TOKEN": TOKEN}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "replica", "-c", str(workdir / "replica.yaml")],
            stdout=log,
            stderr=log,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "-c", str(workdir / "gateway.yaml")],
            stdout=log,
            stderr=log,
            env=env,
        ),
    ]
    try:
        wait_http(f"{replica_url}/ping", 60)
        wait_http(f"{gateway_url}/readyz", 30)
        codes = {
            "replica": schemathesis(replica_url, examples, workdir / "replica-report", []),
            "gateway": schemathesis(
                gateway_url,
                examples,
                workdir / "gateway-report",
                [f"Authorization: Bearer {TOKEN}"],
            ),
            # The replica's API again, through the gateway's proxy.
            "through_gateway": schemathesis(
                replica_url, examples, workdir / "proxied-report", [], base_url=gateway_url
            ),
        }
        alive = all(p.poll() is None for p in procs)
        codes["processes_alive"] = 0 if alive else 1
        time.sleep(0.5)
        codes["still_serving"] = 0 if httpx.get(f"{gateway_url}/readyz").status_code == 200 else 1
        return codes
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500, help="per operation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        codes = run(args.examples, Path(tmp))
    print(codes)
    sys.exit(1 if any(codes.values()) else 0)


if __name__ == "__main__":
    main()
