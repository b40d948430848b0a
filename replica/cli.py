"""Command line: `replica [-c replica.yaml] [flags]` serves; `replica calibrate` writes a profile.

Flags override config keys before validation, so errors still name the key path. SIGTERM or
Ctrl-C drains: /ping goes 503, in-flight requests finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.logfilter import answer_in_json, filter_malformed_requests
from replica.config import ConfigError, ReplicaConfig, load_config, parse_config, read_raw
from replica.keys import STATE
from replica.server import create_app

log = logging.getLogger("replica")
_DEFAULT_MODELS = [{"kind": "tiny-gpt"}, {"kind": "classifier"}]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="replica YAML (default: built-in)")
    parser.add_argument("--device", help="engine.device: auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--engine", choices=["torch", "simulated"], help="engine.kind")
    parser.add_argument("--model", action="append", default=[], help="serve only this model")


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replica", description="Serve models (or: calibrate).")
    _common(parser)
    parser.add_argument("--host", help="server.host")
    parser.add_argument("--port", type=int, help="server.port (0 = any free port)")
    parser.add_argument("--profile", type=Path, help="engine.profile_path (simulated engine)")
    parser.add_argument(
        "--batcher", action="append", default=[], metavar="[MODEL=]KIND",
        help="batcher kind for every model, or for one: none, static, dynamic, continuous",
    )  # fmt: skip
    parser.add_argument(
        "--kv-events-config", metavar="JSON",
        help="kv_events keys as vLLM's flag takes them, e.g. "
        '\'{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557"}\'',
    )  # fmt: skip
    parser.add_argument("--log-level", default="INFO")
    return parser


def calibrate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replica calibrate", description=calibrate_doc())
    _common(parser)
    parser.add_argument("-o", "--out", type=Path, default=Path("profile-measured.yaml"))
    parser.add_argument("--name", default="tiny-gpt-measured")
    return parser


def calibrate_doc() -> str:
    return "Time the torch engine on this machine and write a simulated-engine profile."


def _model_name(model: Any) -> str:
    return str(model.get("name", model.get("kind"))) if isinstance(model, dict) else "?"


def _select_models(models: list[Any], names: list[str]) -> list[Any]:
    have = [_model_name(m) for m in models]
    for name in names:
        if name not in have:
            raise ConfigError(f"--model: '{name}' is not configured (have: {', '.join(have)})")
    return [m for m in models if _model_name(m) in names] if names else models


def _set_batcher(models: list[Any], spec: str) -> None:
    target, _, kind = spec.rpartition("=")
    matched = False
    for model in models:
        if isinstance(model, dict) and target in ("", _model_name(model)):
            old = model.get("batcher") or {}
            keep = {k: v for k, v in old.items() if k in ("max_queue", "queue_timeout_ms")}
            model["batcher"] = {**keep, "kind": kind}
            matched = True
    if not matched:
        raise ConfigError(f"--batcher: no served model named '{target}'")


def _kv_events(config: dict[str, Any], flag: str) -> dict[str, Any]:
    """The config's `kv_events` keys, with those of `--kv-events-config` over them."""
    try:
        keys = json.loads(flag)
    except ValueError as error:
        raise ConfigError(f"--kv-events-config: invalid JSON: {error}") from None
    if not isinstance(keys, dict):
        raise ConfigError(f"--kv-events-config: expected a JSON object, got {flag!r}")
    section = config.get("kv_events")
    return {**(section if isinstance(section, dict) else {}), **keys}


def apply_overrides(raw: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Fold command-line flags into the raw config mapping (validated afterwards)."""
    config: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    server = dict(config.get("server") or {})
    engine = dict(config.get("engine") or {})
    for key, value in (
        ("host", getattr(args, "host", None)),
        ("port", getattr(args, "port", None)),
    ):
        if value is not None:
            server[key] = value
    profile = getattr(args, "profile", None)
    for key, value in (("kind", args.engine), ("device", args.device), ("profile_path", profile)):
        if value is not None:
            engine[key] = str(value)
    models = [
        dict(m) if isinstance(m, dict) else m for m in config.get("models") or _DEFAULT_MODELS
    ]
    models = _select_models(models, args.model)
    for spec in getattr(args, "batcher", []):
        _set_batcher(models, spec)
    kv_events = getattr(args, "kv_events_config", None)
    if kv_events is not None:
        config["kv_events"] = _kv_events(config, kv_events)
    return {**config, "server": server, "engine": engine, "models": models}


def build_config(args: argparse.Namespace) -> ReplicaConfig:
    raw = read_raw(args.config) if args.config else {}
    return parse_config(apply_overrides(raw, args))


async def serve(config: ReplicaConfig) -> int:
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    assert runner.server is not None
    answer_in_json(runner.server)  # what aiohttp's parser refuses, in our JSON shape too
    site = web.TCPSite(runner, config.server.host, config.server.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"replica listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state = app[STATE]
    await state.settled.wait()
    if state.phase == "failed":
        log.error("model loading failed: %s", state.load_error)
        await runner.cleanup()
        return 1
    log.info("ready: %s", ", ".join(m.name for m in config.models))
    await stop.wait()
    log.info("draining: %d requests in flight", state.inflight)
    if not await state.drain(config.server.drain_timeout_s):
        log.warning("drain timed out after %.0f s", config.server.drain_timeout_s)
    await runner.cleanup()
    return 0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def calibrate_main(argv: list[str]) -> int:
    from replica.engines.calibrate import calibrate
    from replica.engines.profile import dump_profile

    args = calibrate_parser().parse_args(argv)
    config = build_config(args)
    profile = calibrate(config, args.name)
    dump_profile(profile, args.out, f"Measured by `replica calibrate` ({sys.platform}).")
    print(f"wrote {args.out}")
    return 0


def check_main(argv: list[str]) -> int:
    """`replica check FILE...`: validate replica files without loading a model (exit 2 when
    one fails); `replica schema`: the replica file's JSON Schema, for editors."""
    failed = False
    for path in argv:
        try:
            load_config(path)
        except ConfigError as error:
            failed = True
            print(f"{path}: {error}")
        else:
            print(f"{path}: ok")
    return 2 if failed or not argv else 0


def schema_main() -> int:
    document = ReplicaConfig.model_json_schema(by_alias=True)
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema", **document}
    document["title"] = "infergate replica configuration"
    try:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["calibrate"]:
            return calibrate_main(argv[1:])
        if argv[:1] == ["check"]:
            return check_main(argv[1:])
        if argv[:1] == ["schema"]:
            return schema_main()
        args = serve_parser().parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
        filter_malformed_requests()  # parser errors quote the request: a client's API key
        return _run(serve(build_config(args)))
    except ConfigError as error:
        print(f"replica: config error: {error}", file=sys.stderr)
        return 2
