"""`infergate jobs`: submit a JSONL batch file (and follow it with a progress bar), show a job
or batch, download a batch's results. It talks HTTP to a running gateway (--url, or
INFERGATE_URL, default http://127.0.0.1:8080) with the standard library only, with the API key
of --api-key or INFERGATE_API_KEY when the gateway has `auth`.

Exit codes: 0 done (every line succeeded, for `submit --wait`), 1 some lines failed or the
batch was cancelled, 2 a request the gateway refused or could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 60.0


class ApiError(Exception):
    """The gateway refused the request (its message says why) or could not be reached."""


@dataclass(frozen=True)
class Api:
    url: str
    key: str | None = None  # sent as `Authorization: Bearer <key>`


def _open(api: Api, method: str, path: str, data: bytes | None = None) -> Any:
    headers = {"Content-Type": "application/jsonl"} if data is not None else {}
    if api.key:
        headers["Authorization"] = f"Bearer {api.key}"
    request = urllib.request.Request(api.url + path, data=data, method=method, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise ApiError(f"{exc.code}: {_error_message(exc.read())}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(f"cannot reach the gateway at {api.url}: {reason}") from None


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:500]


def call(api: Api, method: str, path: str, data: bytes | None = None) -> dict[str, Any]:
    with _open(api, method, path, data) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def progress_line(batch: dict[str, Any], width: int = 30) -> str:
    counts = batch["request_counts"]
    total, failed = counts["total"], counts["failed"]
    done = counts["completed"] + failed
    filled = width * done // total if total else width
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}] {done}/{total} done, {failed} failed ({batch['status']})"


def wait_for(api: Api, batch: dict[str, Any], interval_s: float, out: IO[str]) -> dict[str, Any]:
    tty = out.isatty()
    shown = ""
    while True:
        line = progress_line(batch)
        if line != shown:
            out.write(("\r" + line) if tty else (line + "\n"))
            out.flush()
            shown = line
        if batch["status"] not in ("in_progress", "cancelling"):
            if tty:
                out.write("\n")
            return batch
        time.sleep(interval_s)
        batch = call(api, "GET", f"/v1/batches/{batch['id']}")


def submit(args: argparse.Namespace) -> int:
    data = args.file.read_bytes()
    batch = call(_api(args), "POST", "/v1/batches", data)
    print(batch["id"], flush=True)
    if not args.wait:
        return 0
    batch = wait_for(_api(args), batch, args.poll_interval_s, sys.stderr)
    ok = batch["status"] == "completed" and batch["request_counts"]["failed"] == 0
    return 0 if ok else 1


def status(args: argparse.Namespace) -> int:
    kind = "batches" if args.id.startswith("batch_") else "jobs"
    print(json.dumps(call(_api(args), "GET", f"/v1/{kind}/{args.id}"), indent=2))
    return 0


def results(args: argparse.Namespace) -> int:
    out = args.output.open("wb") if args.output else sys.stdout.buffer
    try:
        if args.id.startswith("batch_"):
            with _open(_api(args), "GET", f"/v1/batches/{args.id}/results") as response:
                shutil.copyfileobj(response, out)
        else:
            job = call(_api(args), "GET", f"/v1/jobs/{args.id}")
            line = {key: job[key] for key in ("id", "custom_id", "response", "error")}
            out.write((json.dumps(line) + "\n").encode())
    finally:
        if args.output:
            out.close()
    return 0


def _api(args: argparse.Namespace) -> Api:
    return Api(args.url, args.api_key)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=os.environ.get("INFERGATE_URL", DEFAULT_URL), help="the gateway"
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("INFERGATE_API_KEY"),
        help="when the gateway has `auth` (default: $INFERGATE_API_KEY)",
    )
    top = argparse.ArgumentParser(prog="infergate jobs", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    one = commands.add_parser("submit", parents=[common], help="submit a JSONL batch file")
    one.add_argument("file", type=Path, help="one request per line (OpenAI Batch format)")
    one.add_argument("--wait", action="store_true", help="follow it to the end, with progress")
    one.add_argument("--poll-interval-s", type=float, default=0.5)
    one.set_defaults(run=submit)
    one = commands.add_parser("status", parents=[common], help="a job or batch, as JSON")
    one.add_argument("id", help="job_... or batch_...")
    one.set_defaults(run=status)
    one = commands.add_parser("results", parents=[common], help="download results as JSONL")
    one.add_argument("id", help="batch_... (or job_...)")
    one.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    one.set_defaults(run=results)
    return top


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ApiError as exc:
        print(f"infergate jobs {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the input or output file
        print(f"infergate jobs {args.command}: {exc}", file=sys.stderr)
        return 2
    return code
