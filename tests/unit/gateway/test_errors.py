"""One error shape and one key-path syntax in the gateway: config files and job bodies name a
location the same way (`replicas[2].url`), and every error answer is {"error": {type, message}}."""

from __future__ import annotations

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError, InvalidRequest, error_body, key_path
from gateway.jobs.requests import parse_batch, parse_job


def test_key_paths_use_dots_for_names_and_brackets_for_positions() -> None:
    assert key_path(("replicas", 2, "url")) == "replicas[2].url"
    assert key_path(("body", "messages", 0, "content")) == "body.messages[0].content"
    assert key_path((0,)) == "[0]"
    assert key_path(()) == "(top level)"


def test_config_and_job_errors_share_the_syntax() -> None:
    with pytest.raises(ConfigError) as config_error:
        parse_config({"replicas": [{"url": "http://a:1"}, {"url": "ftp://b"}]})
    assert str(config_error.value).startswith("replicas[1].url: ")
    with pytest.raises(InvalidRequest) as job_error:
        parse_job({"url": "/v1/completions", "body": {}, "custom_id": ""})
    assert str(job_error.value).startswith("custom_id: ")
    (line,) = parse_batch(b'{"custom_id": "a", "url": "/v1/x", "body": [1]}', max_lines=1)
    assert line.error is not None and line.error.startswith("body: ")


def test_the_error_shape() -> None:
    assert error_body("unauthorized", "no key") == {
        "error": {"type": "unauthorized", "message": "no key"}
    }
