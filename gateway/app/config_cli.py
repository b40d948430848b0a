"""`infergate config`: the gateway file's JSON Schema, for editors (`schema`), and a check of
files without starting a gateway (`check`), as `nginx -t` or `promtool check config` do.

    infergate config schema [--replica] > infergate.schema.json
    infergate config check [--replica] gateway.yaml [more.yaml ...]

`check` reads each file as the gateway would (YAML bounded, `${NAME}` from the environment,
every value validated, a tokenizer file loaded) and prints `FILE: ok`, or each problem on its
own line as `FILE: key.path: what to fix`, without any secret; it exits 2 when a file fails.
With `--replica`, the same for replica files (`python -m replica check|schema`).
An editor with a YAML language server validates and completes a file that starts with
`# yaml-language-server: $schema=infergate.schema.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from gateway.config import load_config
from gateway.config.schema import GatewayConfig
from gateway.errors import ConfigError

SCHEMA_ID = "https://infergate.dev/schema/gateway.json"  # a name, not fetched


def schema() -> dict[str, object]:
    """The JSON Schema (2020-12) of the gateway file, from its pydantic models."""
    document = GatewayConfig.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **document,
        "title": "infergate gateway configuration",
    }


def check(paths: list[str]) -> int:
    failed = False
    for path in paths:
        try:
            load_config(path)
        except ConfigError as exc:
            failed = True
            for problem in exc.problems:
                print(f"{path}: {problem}")
        else:
            print(f"{path}: ok")
    return 2 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="infergate config", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    schema_of = commands.add_parser("schema", help="print the gateway file's JSON Schema")
    checking = commands.add_parser("check", help="validate gateway files; exit 2 if one fails")
    checking.add_argument("files", nargs="+", metavar="FILE")
    for sub in (schema_of, checking):
        sub.add_argument("--replica", action="store_true", help="replica files instead")
    args = parser.parse_args(argv)
    if args.replica:  # the replica's own command knows its files (gateway/ never imports it)
        return _replica([args.command, *getattr(args, "files", [])])
    if args.command == "schema":
        try:
            sys.stdout.write(json.dumps(schema(), indent=2) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return check(args.files)


def _replica(argv: list[str]) -> int:
    if importlib.util.find_spec("replica") is None:
        print(
            "infergate config --replica: the replica package is not installed here", file=sys.stderr
        )
        return 2
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "replica", *argv])
