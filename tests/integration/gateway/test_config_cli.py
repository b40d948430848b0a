"""`infergate config schema` and `infergate config check`, run as a user runs them: the schema
accepts a real gateway file and rejects a misspelt key (as an editor's YAML extension would),
and `check` prints every problem of a broken file by its key path, with no secret, exit 2; the
same for replica files with `--replica`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.support.processes import BIN

GOOD = {
    "listen": {"host": "127.0.0.1", "port": 8080},
    "routing": {"strategy": "precise_prefix", "prefix": {"events": {"replay_port": 5558}}},
    "replicas": [
        {"url": "http://10.0.0.5:8000"},
        {"url": "http://10.0.0.6:8000", "kv_events": {"endpoint": "tcp://10.0.0.6:6000"}},
    ],
    "auth": {"api_keys": [{"name": "team-a", "key": "sk-team-a-0123456789", "class": "standard"}]},
    "flow_control": {"classes": [{"name": "standard"}]},
}


def infergate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "infergate"), "config", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def write(path: Path, config: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_schema_accepts_a_real_file_and_rejects_a_misspelt_key() -> None:
    result = infergate("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors(GOOD)) == []
    misspelt = {**GOOD, "routing": {"stratgy": "random"}}
    assert [e.message for e in validator.iter_errors(misspelt)] == [
        "Additional properties are not allowed ('stratgy' was unexpected)"
    ]


def test_check_passes_a_good_file_and_names_every_problem_of_a_bad_one(tmp_path: Path) -> None:
    good = write(tmp_path / "good.yaml", GOOD)
    bad = write(
        tmp_path / "bad.yaml",
        {
            "replicas": [{"url": "ftp://10.0.0.5"}],
            "routing": {"strategy": "nope"},
            "limits": {"max_queue": -1},
            "jobs": {"store": "postgresql://gw:s3cret-pass@db/jobs", "lease_s": 0},
        },
    )
    result = infergate("check", good, bad)
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert lines[0] == f"{good}: ok"
    problems = sorted(line.removeprefix(f"{bad}: ").split(":")[0] for line in lines[1:])
    assert problems == ["jobs.lease_s", "limits.max_queue", "replicas[0].url", "routing.strategy"]
    assert "s3cret-pass" not in result.stdout + result.stderr
    assert infergate("check", good).returncode == 0
    assert infergate("check", str(tmp_path / "missing.yaml")).returncode == 2


def test_replica_files_are_checked_and_described_the_same_way(tmp_path: Path) -> None:
    good = write(tmp_path / "replica.yaml", {"engine": {"kind": "simulated"}})
    bad = write(tmp_path / "bad.yaml", {"server": {"port": -5}, "engine": {"kind": "tpu"}})
    result = infergate("check", "--replica", good, bad)
    assert result.returncode == 2
    ok, problem = result.stdout.splitlines()
    assert ok == f"{good}: ok"
    assert problem.startswith(f"{bad}: ") and "server.port" in problem and "engine.kind" in problem
    schema = json.loads(infergate("schema", "--replica").stdout)
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors({"engine": {"kind": "simulated"}})) == []
    assert list(validator.iter_errors({"engine": {"kind": "tpu"}})) != []
