"""Config validation: every error names its key path."""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.cluster import load_cluster
from gateway.config import load_config, parse_config, redacted
from gateway.errors import ConfigError

URL = "http://127.0.0.1:9001"


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_minimal_file_gets_defaults() -> None:
    config = parse_config({"replicas": [{"url": URL + "/"}]})
    assert config.replica_urls == [URL]
    assert config.routing.strategy == "least_outstanding_requests"
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert config.health_check is None


def test_issue_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "listen: {host: 127.0.0.1, port: 8080}\n"
        "routing:\n  strategy: LEAST_OUTSTANDING_REQUESTS\n"
        "replicas:\n  - url: http://127.0.0.1:9001\n  - url: http://127.0.0.1:9002\n"
    )
    config = load_config(path)
    assert config.routing.strategy == "least_outstanding_requests"
    assert config.replica_urls == [URL, "http://127.0.0.1:9002"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"replicas": [{"url": URL}], "routing": {"stratgy": "random"}},
            "routing.stratgy: unknown",
        ),
        ({"replicas": [{"url": URL}, {"url": "localhost"}]}, "replicas[1].url: expected an abs"),
        ({"replicas": [{"url": URL}, {"url": URL}]}, "replicas[1].url: http://127.0.0.1:9001 is"),
        ({"replicas": [{"url": URL + "?a=1"}]}, "replicas[0].url: a replica URL takes no query"),
        ({"replicas": [{"url": URL}], "timeouts": {"connect_s": 0}}, "timeouts.connect_s: "),
        ({"replicas": [{"url": URL}], "listen": {"port": 70000}}, "listen.port: "),
        ({"replicas": [{"url": URL}], "health_check": {"path": "x"}}, "health_check.path: "),
        ({"replicas": [{"url": 5}]}, "replicas[0].url: "),
        ({"replicas": None}, "replicas: "),
        (None, "the file is empty"),
    ],
)
def test_errors_name_the_key_path(data: Any, expected: str) -> None:
    assert expected in _error(data)


def test_several_errors_are_reported_together_on_one_line() -> None:
    message = _error({"replicas": [{"url": "x"}], "routing": {"strategy": "y"}, "extra": 1})
    assert "\n" not in message
    for path in ("replicas[0].url", "routing.strategy", "extra: unknown key"):
        assert path in message


def test_yaml_errors_give_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("replicas:\n  - url: 'unterminated\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load_config(path)


DISCOVERY = {"dns": "infergate-replica", "port": 9001}


def test_discovery_replaces_the_static_list() -> None:
    config = parse_config({"discovery": {**DISCOVERY, "nameserver": "127.0.0.1:5353"}})
    assert config.replicas is None and config.replica_urls == []
    assert config.discovery is not None
    assert (config.discovery.interval_s, config.discovery.nameserver) == (5.0, "127.0.0.1:5353")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "replicas: required key is missing (or give 'discovery' instead)"),
        ({"replicas": [{"url": URL}], "discovery": DISCOVERY}, "discovery: give either"),
        ({"discovery": {"dns": "x"}}, "discovery.port: required key is missing"),
        ({"discovery": {**DISCOVERY, "nameserver": "10.0.0.1"}}, "discovery.nameserver: expected"),
        (
            {"discovery": {**DISCOVERY, "nameserver": "10.0.0.1:5\u00b2"}},
            "discovery.nameserver: expected",
        ),
        ({"discovery": {**DISCOVERY, "interval_s": 0}}, "discovery.interval_s: "),
        ({"replicas": [{"url": URL}], "ui": {"enabled": "maybe"}}, "ui.enabled: "),
    ],
)
def test_discovery_errors_name_the_key_path(data: Any, expected: str) -> None:
    assert _error(data).startswith(expected)


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("postgresql://u@h:x/db", "jobs.store: the URL's port is not a number"),
        ("postgresql://u@h:5432/", "name the database: postgresql://user@host:5432/DBNAME"),
        ("mysql://h/db", "'mysql://' is not a job store"),
        ("  ", "a file path for an SQLite job store or a postgresql://"),
    ],
)
def test_a_job_store_that_is_neither_a_file_nor_a_postgresql_url_is_refused(
    store: str, expected: str
) -> None:
    assert expected in _error({"replicas": [{"url": URL}], "jobs": {"store": store}})


@pytest.mark.parametrize("store", ["/var/lib/jobs.db", "postgresql://u@127.0.0.1:5432/jobs"])
def test_a_job_store_is_a_file_or_a_postgresql_url(store: str) -> None:
    config = parse_config({"replicas": [{"url": URL}], "jobs": {"store": store}})
    assert config.jobs is not None and config.jobs.store == store and config.jobs.lease_s == 30


def test_a_job_store_url_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"replicas": [{"url": URL}], "jobs": {"store": "${INFERGATE_TEST_STORE}"}}
    monkeypatch.delenv("INFERGATE_TEST_STORE", raising=False)
    assert _error(data) == (
        "jobs.store: ${INFERGATE_TEST_STORE} is not set in the gateway's environment (set it, "
        "e.g. from a Kubernetes Secret with env[].valueFrom.secretKeyRef) "
        "(got '${INFERGATE_TEST_STORE}')"  # the reference, never the secret
    )
    monkeypatch.setenv("INFERGATE_TEST_STORE", "postgresql://u:secret@db:5432/jobs")
    config = parse_config(data)
    assert config.jobs is not None and config.jobs.store == "postgresql://u:secret@db:5432/jobs"
    monkeypatch.setenv("INFERGATE_TEST_STORE", "mysql://db/jobs")
    assert "'mysql://' is not a job store" in _error(data)


SECRET = "hunter2-Kx9"
WITH_STORE = {"replicas": [{"url": URL}]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {**WITH_STORE, "jobs": {"store": f"mysql://admin:{SECRET}@db/jobs"}},
            "(got 'mysql://admin:***@db/jobs')",
        ),
        (
            {**WITH_STORE, "jobs": {"store": f"postgresql://admin:{SECRET}@db:x/jobs"}},
            "jobs.store: the URL's port is not a number (got 'postgresql://admin:***@db:x/jobs')",
        ),
        (
            {**WITH_STORE, "jobs": {"store": f"postgresql://admin@db:x/j?password={SECRET}"}},
            "(got 'postgresql://admin@db:x/j?password=***')",
        ),
        (  # unencoded '/', '@' and '#' in the password
            {**WITH_STORE, "jobs": {"store": f"postgresql://admin:a/{SECRET}@#x@db:x/jobs"}},
            "(got 'postgresql://admin:***@db:x/jobs')",
        ),
        ({**WITH_STORE, "jobs": [f"postgresql://u:{SECRET}@db/jobs"]}, "u:***@db"),
        (
            {"replicas": [{"url": f"http://admin:{SECRET}@127.0.0.1:9001"}]},
            "takes no query, fragment or credentials (got 'http://admin:***@127.0.0.1:9001')",
        ),
        (  # an API key also written where a value is quoted
            {
                **WITH_STORE,
                "auth": {"api_keys": [{"name": "a", "key": SECRET}]},
                "listen": {"port": SECRET},
            },
            "listen.port: Input should be a valid integer",
        ),
    ],
)
def test_config_errors_never_show_a_credential(data: Any, expected: str) -> None:
    message = _error(data)
    assert expected in message
    assert SECRET not in message and "hunter2" not in message


def test_a_credential_from_the_environment_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_TEST_STORE", f"mysql://admin:{SECRET}@db/jobs")
    message = _error({**WITH_STORE, "jobs": {"store": "${INFERGATE_TEST_STORE}"}})
    assert "'mysql://' is not a job store" in message and SECRET not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://admin:{SECRET}@db:5432/jobs", "postgresql://admin:***@db:5432/jobs"),
        (f"postgresql://admin:a/@#{SECRET}@db/jobs", "postgresql://admin:***@db/jobs"),
        (
            f"postgresql://db/jobs?user=a&password={SECRET}&x=1",
            "postgresql://db/jobs?user=a&password=***&x=1",
        ),
        ("postgresql://admin@db/jobs", "postgresql://admin@db/jobs"),
        (f"host=db password={SECRET}", "host=db password=***"),
        ("/var/lib/jobs.db", "/var/lib/jobs.db"),
    ],
)
def test_redacted_hides_any_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


def _nine_of_each_above(first: str, template: str, levels: int, last: str) -> str:
    """The billion-laughs shape: each level nine aliases of the one above."""
    names = "abcdefghijk"[:levels]
    lines = [f"a: &a {first}"]
    for above, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} " + template.format(", ".join([f"*{above}"] * 9)))
    return "\n".join(lines) + f"\n{last}: *{names[-1]}\n"


LOLS = "[" + ", ".join(["lol"] * 9) + "]"


@pytest.mark.parametrize(
    "text",
    [
        _nine_of_each_above(LOLS, "[{}]", 8, "listen"),  # 43 million values: 19 s, 360 MB before
        _nine_of_each_above(LOLS, "[{}]", 8, "replicas"),
        _nine_of_each_above("{k: 1}", "{{<<: [{}]}}", 8, "replicas"),  # merge keys
        "replicas: &r [*r]\n",  # recursive
    ],
)
def test_an_alias_bomb_is_refused_at_once(text: str, tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.perf_counter() - started < 1.0
    assert str(info.value).startswith("(yaml) line ")
    assert "alias" in str(info.value)


def test_nesting_deeper_than_any_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("replicas: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"\(yaml\) line 1, column \d+: .*nested deeper than"):
        load_config(path)


def test_aliases_within_the_budget_still_work(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "replicas:\n  - {url: 'http://127.0.0.1:9001', models: &m [llama, qwen]}\n"
        "  - {url: 'http://127.0.0.1:9002', models: *m}\n"
    )
    models = load_config(path).replica_models
    assert list(models.values()) == [("llama", "qwen")] * 2


def test_errors_quote_little_and_list_at_most_ten_problems() -> None:
    message = _error({"replicas": [{"url": "x" * 10_000 + str(i)} for i in range(50)]})
    assert message.count("replicas[") == 10
    assert message.endswith("; and 40 more")
    assert all(len(part) < 200 for part in message.split("; "))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_nine_of_each_above(LOLS, "[{}]", 8, "gateway"), "aliases expand to more than"),
        (
            f"gateway:\n  jobs: {{store: 'mysql://u:{SECRET}@db'}}\n  x: [unclosed\n",
            "(yaml) line 4",
        ),
        ("- a list\n", "(top level): expected a mapping, got list"),
    ],
)
def test_the_cluster_file_is_read_as_boundedly(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_cluster(path, argparse.Namespace(replicas=None, model=None, engine=None))
    assert time.perf_counter() - started < 1.0
    assert expected in str(info.value) and SECRET not in str(info.value)


def test_jobs_storage_quota_per_key_defaults_and_none() -> None:
    jobs = parse_config({**WITH_STORE, "jobs": {"store": "/tmp/j.db"}}).jobs
    assert jobs is not None
    assert (jobs.max_bytes_per_key, jobs.max_lines_per_key) == (256 * 1024 * 1024, 200_000)
    off = {"store": "/tmp/j.db", "max_bytes_per_key": None, "max_lines_per_key": None}
    jobs = parse_config({**WITH_STORE, "jobs": off}).jobs
    assert jobs is not None and jobs.max_bytes_per_key is None and jobs.max_lines_per_key is None
    assert "jobs.max_lines_per_key: " in _error(
        {**WITH_STORE, "jobs": {**off, "max_lines_per_key": 0}}
    )
