"""Parsing job bodies and batch files: every bad input says what to fix."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.jobs.requests import parse_batch, parse_job

GOOD = {"url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 4}}

BAD_JOBS = {
    "not an object": ([1, 2], "expected a JSON object"),
    "no url": ({"body": {}}, "url: required key is missing"),
    "relative url": ({**GOOD, "url": "v1/completions"}, "url: expected a replica path"),
    "space in url": ({**GOOD, "url": "/v1/a b"}, "url: expected printable ASCII"),
    "gateway path": ({**GOOD, "url": "/v1/jobs"}, "the gateway's own endpoint"),
    "body not object": ({**GOOD, "body": "hi"}, "body: "),
    "stream": ({**GOOD, "body": {"stream": True}}, "'stream': true is not supported"),
    "method": ({**GOOD, "method": "GET"}, "method: "),
    "extra key": ({**GOOD, "modle": "x"}, "modle: unknown key"),
}


def test_a_good_job_parses() -> None:
    job = parse_job(GOOD)
    assert (job.method, job.url, job.custom_id) == ("POST", "/v1/completions", None)
    assert job.body_json() == '{"prompt":"hi","max_tokens":4}'


@pytest.mark.parametrize("case", BAD_JOBS)
def test_bad_jobs_are_refused_with_the_reason(case: str) -> None:
    data, expected = BAD_JOBS[case]
    with pytest.raises(InvalidRequest) as info:
        parse_job(data)
    assert expected in str(info.value)


def test_bad_batch_lines_fail_alone_with_their_line_number() -> None:
    data = (
        b'{"custom_id": "a", "url": "/v1/completions", "body": {}}\n'
        b"\n"
        b"[1]\n"
        b'{"custom_id": "b", "url": "/v1/completions"}\r\n'
        b'{"url": "/v1/completions", "body": {}}\n'
        b"\xff\xfe\n"
        b'{"custom_id": "c", "url": "/v1/completions", "body": {}, '
    )
    lines = parse_batch(data, max_lines=100)
    assert [line.line for line in lines] == [1, 3, 4, 5, 6, 7]
    assert lines[0].request is not None and lines[0].error is None
    errors = [line.error for line in lines[1:]]
    assert errors[0] == "expected a JSON object, got list"
    assert errors[1] == "body: required key is missing"
    assert errors[2] is not None and errors[2].startswith("custom_id: required")
    assert errors[3] == "the line is not UTF-8 text"
    assert errors[4] is not None and errors[4].startswith("not valid JSON")


def test_batch_limits_and_empty_files() -> None:
    with pytest.raises(InvalidRequest, match="no requests"):
        parse_batch(b"\n  \n", max_lines=10)
    line = b'{"custom_id": "x", "url": "/a", "body": {}}\n'
    with pytest.raises(InvalidRequest, match=r"3 lines, over jobs.max_batch_lines = 2"):
        parse_batch(line * 3, max_lines=2)
