"""Parsing job bodies and batch files: every bad input says what to fix."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.jobs.requests import MAX_JOB_DEPTH, parse_batch, parse_job, parse_job_body

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
    "dot segment": ({**GOOD, "url": "/v1/../admin/x"}, "url: the path holds a '.' or '..'"),
    "encoded dot segment": ({**GOOD, "url": "/v1/%2E%2e/x?a=b"}, "'.' or '..' segment"),
    "dot behind a backslash": ({**GOOD, "url": "/v1\\..\\x"}, "'.' or '..' segment"),
    "single dot": ({**GOOD, "url": "/./v1/completions"}, "'.' or '..' segment"),
}


def test_a_good_job_parses() -> None:
    job = parse_job(GOOD)
    assert (job.method, job.url, job.custom_id) == ("POST", "/v1/completions", None)
    assert job.body_json() == '{"prompt":"hi","max_tokens":4}'
    for url in ("/v1/completions?x=/../y", "/v1/.well-known/x", "/v1/a..b"):
        assert parse_job({**GOOD, "url": url}).url == url  # dots that are no segment of the path


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


def _line(custom_id: str = "c", body: str = "{}") -> bytes:
    return f'{{"custom_id": "{custom_id}", "url": "/v1/completions", "body": {body}}}'.encode()


def test_json_past_the_depth_limit_is_refused_and_brackets_in_strings_are_text() -> None:
    deep = "[" * (MAX_JOB_DEPTH - 1) + "]" * (
        MAX_JOB_DEPTH - 1
    )  # the line nests one past the limit
    at_limit = "[" * (MAX_JOB_DEPTH - 2) + "]" * (MAX_JOB_DEPTH - 2)
    texts = '{"a": "[[[[\\"' + "{" * 5000 + '"}'
    assert parse_job_body(_line(body='{"x": ' + at_limit + "}")).custom_id == "c"
    assert parse_job_body(_line(body=texts)).body["a"].endswith("{" * 5000)
    for bad in (_line(body='{"x": ' + deep + "}"), b"[" * 100_000, _line(body="[" * 5000)):
        with pytest.raises(InvalidRequest, match=f"deeper than {MAX_JOB_DEPTH} levels"):
            parse_job_body(bad)


def test_lone_surrogates_and_huge_integers_are_refused_and_fail_their_line_alone() -> None:
    surrogate, huge = _line(custom_id="\\udc80"), _line(body='{"n": ' + "9" * 5000 + "}")
    with pytest.raises(InvalidRequest, match="custom_id: must be valid Unicode"):
        parse_job_body(surrogate)
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_job_body(huge)
    deep = _line(body="[" * 5000 + "]" * 5000)
    lines = parse_batch(b"\n".join([_line("a"), surrogate, huge, deep, _line("b")]), 10)
    assert [line.error is None for line in lines] == [True, False, False, False, True]
    assert lines[1].error is not None and lines[1].error.startswith("custom_id: must be valid")
    assert lines[2].error is not None and lines[2].error.startswith("not valid JSON")
    assert lines[3].error is not None and "deeper than" in lines[3].error
