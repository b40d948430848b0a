"""The `infergate` command: `gateway` runs the gateway; `replica`, `up` and `jobs` hand over to
the replica server, the local cluster launcher and the jobs client. Only this module touches
argv, signals and exit codes; the replica package (and torch) is imported only when its
subcommand runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.listener import limit_connections
from gateway.server import WATCHER, create_app

log = logging.getLogger("gateway")

ADMIN_TOKEN_ENV = "INFERGATE_ADMIN_TOKEN"
DRAIN_TIMEOUT_S = 30.0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a client's malformed HTTP (bad framing, NUL bytes, over-long headers) with a
    traceback at ERROR; it is the client's fault and answered 400, so one warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"{record.getMessage()}: malformed request: {error.message}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())


async def serve(config: GatewayConfig, config_path: Path, host: str, port: int) -> int:
    token = os.environ.get(ADMIN_TOKEN_ENV) or None
    app = create_app(config, config_path=config_path, admin_token=token)
    limits = config.limits
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=DRAIN_TIMEOUT_S,
        keepalive_timeout=limits.client_keepalive_s,
        max_line_size=limits.max_header_bytes,
        max_field_size=limits.max_header_bytes,
    )
    try:
        await runner.setup()
    except ConfigError:  # found while starting (the job store): close what was opened
        await runner.cleanup()
        raise
    if limits.max_connections is not None:
        limit_connections(runner, limits.max_connections)
    site = web.TCPSite(runner, host, port, backlog=1024)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()  # close what setup() opened (the client session, tasks)
        raise
    log.info("infergate gateway listening on %s", site.name)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app[WATCHER].wake)
    await stop.wait()
    log.info("stopping: no new connections, waiting for requests in flight")
    await runner.cleanup()
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"infergate gateway: {args.config}: {exc}", file=sys.stderr)
        return 2
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(serve(config, Path(args.config).resolve(), host, port))
    except OSError as exc:  # the listening socket: port in use, address not local
        print(f"infergate gateway: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found at start-up, e.g. a job store that cannot be opened
        print(f"infergate gateway: {exc}", file=sys.stderr)
        return 2


def gateway_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("-c", "--config", required=True, help="gateway YAML file")
    parser.add_argument("--host", help="override listen.host")
    parser.add_argument("--port", type=int, help="override listen.port")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="infergate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gateway_parser(commands.add_parser("gateway", help="run the routing gateway"))
    commands.add_parser("replica", help="run a model replica (see: infergate replica -h)")
    commands.add_parser("up", help="run a local cluster: replicas + gateway")
    commands.add_parser("bench", help="the routing benchmark (see: infergate bench -h)")
    commands.add_parser("jobs", help="deferred jobs and batches (see: infergate jobs -h)")
    if argv[:1] == ["replica"]:
        from replica.cli import main as replica_main

        return replica_main(argv[1:])
    if argv[:1] == ["bench"]:
        from loadtests.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["jobs"]:
        from gateway.jobs.client import main as jobs_main

        return jobs_main(argv[1:])
    if argv[:1] == ["up"]:
        from gateway.cluster import main as up_main

        return up_main(argv[1:])
    args = parser.parse_args(argv)
    return run_gateway(args)
