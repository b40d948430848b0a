"""Config validation: every error names its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config, parse_config
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
