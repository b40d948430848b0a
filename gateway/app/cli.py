"""The `infergate` command: `gateway` runs the gateway, `up` a local cluster (replica processes
from gateway/cluster.py with the gateway in front), `jobs` the jobs client. Only this module
touches argv, signals and exit codes.

`replica` and `bench` belong to the packages above the gateway (replica/, loadtests/): this
process becomes their own entry point (`python -m replica`, `python -m loadtests.bench`) by
exec, as `up` starts replicas, and never imports them; so the gateway package imports neither,
and the slim gateway image, which has neither, runs `infergate gateway` unchanged."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml
from aiohttp import web

from gateway.app.front import FrontSite, gateway_runner
from gateway.app.server import WATCHER, create_app
from gateway.app.workers import (
    STARTUP_SIGNALS,
    Supervisor,
    Worker,
    worker_args,
    worker_count,
    worker_from_args,
)
from gateway.cluster import (
    ClusterConfig,
    banner,
    gateway_yaml,
    load_cluster,
    replicas_running,
    wait_ready,
)
from gateway.config import GatewayConfig, load_config, parse_config
from gateway.errors import ConfigError
from gateway.logfilter import filter_malformed_requests

log = logging.getLogger("gateway")

ADMIN_TOKEN_ENV = "INFERGATE_ADMIN_TOKEN"
DRAIN_TIMEOUT_S = 30.0
# Commands run by their own entry point, a module of a package above this one.
ENTRY_POINTS = {"replica": "replica", "bench": "loadtests.bench"}


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    filter_malformed_requests()


async def serve(
    config: GatewayConfig, config_path: Path, host: str, port: int, worker: Worker | None = None
) -> int:
    token = os.environ.get(ADMIN_TOKEN_ENV) or None
    app = create_app(config, config_path=config_path, admin_token=token, worker=worker)
    runner, front = gateway_runner(app, config, DRAIN_TIMEOUT_S)
    try:
        await runner.setup()
    except ConfigError:  # found while starting (the job store): close what was opened
        await runner.cleanup()
        raise
    front.ready(runner)
    site: web.BaseSite
    if worker is not None:  # this worker's own listening socket (SO_REUSEPORT)
        site = FrontSite(runner, front, sock=socket.socket(fileno=worker.listen_fd))
    else:
        site = FrontSite(runner, front, host=host, port=port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()  # close what setup() opened (the client session, tasks)
        raise
    if worker is not None and worker.index == 0 and config.jobs is not None:
        jobs_site = web.UnixSite(runner, worker.jobs_socket)  # the other workers' way in
        await jobs_site.start()
    log.info("infergate gateway listening on %s", site.name)
    # What start-up built (config, routes, metrics, imported modules) lives as long as the
    # process: out of the collector's sight, a full collection walks only what requests make.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app[WATCHER].wake)
    if worker is not None:  # held since it started (gateway/app/workers.py): handled from here on
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTUP_SIGNALS)
    await stop.wait()
    log.info("stopping: no new connections, waiting for requests in flight")
    await runner.cleanup()
    if worker is not None:
        worker.counts.close()
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
    worker = worker_from_args(args)
    count = worker_count(config.workers)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            path = Path(args.config).resolve()
            if worker is None and count > 1:
                supervisor = Supervisor(path, host, port, count, args.log_level)
                return runner.run(supervisor.run())
            return runner.run(serve(config, path, host, port, worker))
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
    worker_args(parser)
    return parser


async def run_cluster(cluster: ClusterConfig, args: argparse.Namespace, workdir: Path) -> int:
    """`infergate up`: the replicas, then the gateway in front once every one is ready."""
    gateway_data = gateway_yaml(cluster, args)
    config = parse_config(gateway_data)
    config_path = workdir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(gateway_data, sort_keys=False))
    with replicas_running(cluster) as procs:
        # Our own signal handlers from here on, so a Ctrl-C while replicas load still cleans up.
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        ready = asyncio.create_task(wait_ready(config.replica_urls, procs))
        stopped = asyncio.create_task(stopping.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        if stopped.done():
            ready.cancel()
            return 130
        stopped.cancel()
        ready.result()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        url = f"http://{config.listen.host}:{config.listen.port}"
        print(banner(url, config_path), flush=True)
        host, port, count = config.listen.host, config.listen.port, worker_count(config.workers)
        if count > 1:
            return await Supervisor(config_path, host, port, count, args.log_level).run()
        return await serve(config, config_path, host, port)


def up_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infergate up",
        description="A local cluster in one command: N replica processes and the gateway.",
    )
    parser.add_argument("-c", "--config", type=Path, help="cluster YAML (see README)")
    parser.add_argument("--replicas", type=int, help="number of replica processes")
    parser.add_argument(
        "--model", action="append", help="serve only this model on every replica (repeatable)"
    )
    parser.add_argument("--strategy", help="routing strategy, e.g. least_outstanding_requests")
    parser.add_argument("--engine", choices=["torch", "simulated"])
    parser.add_argument("--port", type=int, help="gateway port (default 8080)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser


def run_up(argv: list[str]) -> int:
    args = up_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        cluster = load_cluster(args.config, args)
        parse_config(gateway_yaml(cluster, args))
    except ConfigError as exc:
        print(f"infergate up: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="infergate-") as workdir:
        try:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                return runner.run(run_cluster(cluster, args, Path(workdir)))
        except RuntimeError as exc:
            print(f"infergate up: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # the gateway's listening socket
            print(f"infergate up: cannot listen for the gateway: {exc.strerror}", file=sys.stderr)
            return 1


def run_entry_point(command: str, argv: list[str]) -> int:
    """Replace this process with the command's own entry point (returns only on failure)."""
    module = ENTRY_POINTS[command]
    package = module.partition(".")[0]
    if importlib.util.find_spec(package) is None:  # looks for it without importing it
        print(
            f"infergate {command}: the {package!r} package is not installed here "
            "(pip install 'infergate[replica]' from a checkout)",
            file=sys.stderr,
        )
        return 2
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="infergate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gateway_parser(commands.add_parser("gateway", help="run the routing gateway"))
    commands.add_parser("replica", help="run a model replica (see: infergate replica -h)")
    commands.add_parser("up", help="run a local cluster: replicas + gateway")
    commands.add_parser("bench", help="the routing benchmark (see: infergate bench -h)")
    commands.add_parser("jobs", help="deferred jobs and batches (see: infergate jobs -h)")
    commands.add_parser("config", help="the config file's JSON Schema, and checks of files")
    command, rest = argv[:1], argv[1:]
    if command and command[0] in ENTRY_POINTS:
        return run_entry_point(command[0], rest)
    if command == ["jobs"]:
        from gateway.jobs.client import main as jobs_main

        return jobs_main(rest)
    if command == ["up"]:
        return run_up(rest)
    if command == ["config"]:
        from gateway.app.config_cli import main as config_main

        return config_main(rest)
    args = parser.parse_args(argv)
    return run_gateway(args)
