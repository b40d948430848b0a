"""Every example config the project shows, checked as a user would check it: each YAML block of
README.md and each gateway file under deploy/ (the Docker one, and those inside Kubernetes
ConfigMaps) passes `infergate config check` (`--replica` for replica files) and validates
against `infergate config schema` with jsonschema; a cluster file (`infergate up -c`) loads
and the gateway file it makes passes too.

README blocks that show one section (auth, jobs, routing ...) are checked inside a gateway
file that lists one replica, as a user pastes them; `${NAME}` placeholders get a value."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.cluster import gateway_yaml, load_cluster
from replica.config import ReplicaConfig
from tests.support.processes import BIN
from tests.support.tokenizer_files import write_tokenizer

ROOT = Path(__file__).resolve().parents[3]
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)
BASE = {"replicas": [{"url": "http://127.0.0.1:9001"}]}
ENV = {"INFERGATE_JOBS_STORE": "postgresql://infergate@db:5432/jobs"}
REPLICA_KEYS = set(ReplicaConfig.model_fields)
MODEL_DIRECTORY = "/models/llama-3.1-8b-instruct"  # README's precise_prefix example


def readme_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    return [
        (f"README.md:{text[: m.start()].count(chr(10)) + 2}", m[1])
        for m in YAML_BLOCK.finditer(text)
    ]


def deploy_gateway_files() -> list[tuple[str, str]]:
    """The gateway files under deploy/: plain ones, and those a ConfigMap holds."""
    found = [("deploy/docker/gateway-config/gateway.yaml",
              (ROOT / "deploy/docker/gateway-config/gateway.yaml").read_text())]  # fmt: skip
    for path in sorted((ROOT / "deploy/kubernetes").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and document.get("kind") == "ConfigMap":
                for name, text in (document.get("data") or {}).items():
                    if name.endswith(".yaml") and "gateway" in name:
                        found.append((f"{path.relative_to(ROOT)}:{name}", text))
    return found


def kind_of(data: dict[str, Any]) -> str:
    if "groups" in data or isinstance(data.get("replicas"), int) or "replica_config" in data:
        return "cluster"
    if set(data) <= REPLICA_KEYS and set(data) & {"server", "engine", "kv_events"}:
        return "replica"
    return "gateway"


def examples() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for where, text in readme_blocks() + deploy_gateway_files():
        data = yaml.safe_load(text)
        assert isinstance(data, dict), f"{where}: an example config is a mapping"
        kind = kind_of(data)
        if kind == "gateway" and not {"replicas", "discovery"} & set(data):
            data = {**BASE, **data}  # a section shown alone, pasted into a file
        out.append((where, kind, data))
    return out


@cache
def gateway_schema() -> dict[str, Any]:
    run = subprocess.run([str(BIN / "infergate"), "config", "schema"],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    schema: dict[str, Any] = json.loads(run.stdout)
    return schema


def expand(text: str, tokenizer: Path) -> str:
    """The file with its placeholders filled: environment variables, and the README's model
    directory (a tokenizer a user has) as a real tokenizer's."""
    for name, value in ENV.items():
        text = text.replace("${" + name + "}", value)
    return text.replace(MODEL_DIRECTORY, str(tokenizer))


def test_the_readme_and_deploy_show_examples_of_every_kind() -> None:
    kinds = [kind for _, kind, _ in examples()]
    assert kinds.count("gateway") >= 10 and "replica" in kinds and "cluster" in kinds


def test_every_example_passes_config_check_and_the_schema(tmp_path: Path) -> None:
    files: dict[str, list[str]] = {"gateway": [], "replica": []}
    named: dict[str, str] = {}
    schema = gateway_schema()
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    for n, (where, shown, example) in enumerate(examples()):
        kind, data = checked_as(shown, example, tmp_path / f"cluster{n}.yaml")
        path = tmp_path / f"example{n}.yaml"
        path.write_text(expand(yaml.safe_dump(data), tokenizer))
        files[kind].append(str(path))
        named[str(path)] = where
        if kind == "gateway":
            errors = list(jsonschema.Draft202012Validator(schema).iter_errors(
                yaml.safe_load(path.read_text())))  # fmt: skip
            assert not errors, f"{where}: {errors[0].json_path}: {errors[0].message}"
    for kind, paths in files.items():
        flags = ["--replica"] if kind == "replica" else []
        run = subprocess.run(
            [str(BIN / "infergate"), "config", "check", *flags, *paths],
            capture_output=True, text=True, timeout=120, check=False, env=check_env(),
        )  # fmt: skip
        failures = [line for line in run.stdout.splitlines() if not line.endswith(": ok")]
        problems = [f"{named.get(line.split(':')[0], '?')}: {line}" for line in failures]
        assert run.returncode == 0 and not failures, "\n".join(problems) + run.stderr


def checked_as(kind: str, data: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """What `config check` reads for an example: a cluster file is loaded as `infergate up`
    loads it, and the gateway file it makes (with its replicas) is checked."""
    if kind != "cluster":
        return kind, data
    path.write_text(yaml.safe_dump(data))
    cluster = load_cluster(path, no_flags())
    made = json.loads(json.dumps(gateway_yaml(cluster, no_flags())))
    made["replicas"] = [{"url": f"http://127.0.0.1:{9001 + i}"} for i in range(cluster.size)]
    return "gateway", made


def no_flags() -> argparse.Namespace:
    return argparse.Namespace(replicas=None, model=None, engine=None, strategy=None, port=None)


def check_env() -> dict[str, str]:
    return {**os.environ, **ENV}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("replicas: [{url: http://a:1}]\nroutng: {strategy: random}\n", "routng: unknown key"),
        ("replicas: [{url: http://a:1}]\njobs: {max_batch_lines: 0}\n", "jobs.store"),
    ],
)
def test_a_broken_example_names_its_key_path(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    run = subprocess.run([str(BIN / "infergate"), "config", "check", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 2 and says in run.stdout, run.stdout
