"""The load parser, on recorded and hostile answers: our replica's GET /load and the engines'
/metrics pages, read into the report the pool takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import LoadFeedback
from gateway.control.engines import PRESETS, metric_names
from gateway.control.load import LoadReading, read_load
from gateway.control.probe import PROBE_FAILURES

ANSWERS = Path(__file__).parent / "answers"


def recorded(name: str) -> bytes:
    return (ANSWERS / name).read_bytes()


def test_our_replicas_load_keeps_its_counts_and_share_only() -> None:
    reading = read_load(200, recorded("infergate_load.json"), None)
    assert reading == LoadReading(
        {
            "queued": 1,
            "running": 4,
            "capacity": 8,
            "backlog_tokens": 2048,
            "kv_usage": 0.25,
            "inflight": 5,
            "prefix_cache_queried_tokens": 10240,
            "prefix_cache_hit_tokens": 4096,
        }
    )  # "phase" (a string) and "models" (an object) are left out


@pytest.mark.parametrize(
    ("page", "engine", "report", "by_model"),
    [
        (
            "vllm_metrics.txt", "vllm",
            {"queued": 12, "running": 7, "inflight": 19, "kv_usage": 0.4231},
            {"meta-llama/Llama-3.1-8B-Instruct": 19},
        ),
        (
            "sglang_metrics.txt", "sglang",  # two TP ranks of one engine: one batch
            {"queued": 2, "running": 3, "inflight": 5, "kv_usage": 0.25},
            {"Qwen/Qwen2.5-7B-Instruct": 5},
        ),
        ("tgi_metrics.txt", "tgi", {"queued": 4, "running": 9, "inflight": 13}, {"": 13}),
    ],
)  # fmt: skip
def test_each_engines_recorded_page_is_a_load_report(
    page: str, engine: str, report: dict[str, float], by_model: dict[str, int]
) -> None:
    assert read_load(200, recorded(page), PRESETS[engine]) == LoadReading(report, by_model)


def test_a_page_of_another_engine_or_no_endpoint_is_no_report() -> None:
    assert read_load(200, recorded("tgi_metrics.txt"), PRESETS["vllm"]) is None
    assert read_load(404, b"", PRESETS["vllm"]) is None
    assert read_load(404, b"", None) is None and read_load(503, b"", None) is None
    names = metric_names(LoadFeedback(source="vllm"))
    assert read_load(200, recorded("vllm_metrics.txt"), names) is not None


@pytest.mark.parametrize(
    ("body", "report"),
    [
        (b'{"inflight": 3}', {"inflight": 3}),
        (b'{"inflight": true}', None),
        (b'{"inflight": NaN}', None),
        (b'{"inflight": Infinity}', None),
        (b'{"inflight": -1}', None),
        (b'{"inflight": "3"}', None),
        (b'{"inflight": [3]}', None),
        (b'{"inflight": 1e300}', None),
        (b'{"inflight": 100000000000000000000}', None),
        (b'{"inflight": 2.5}', None),
        (b"[1, 2]", None),
        (b'"inflight"', None),
        (b'{"inflight": 1, "kv_usage": 7, "queued": -2, "x\\u00b2": 1}', {"inflight": 1}),
        (b'{"inflight": 1, "inflight": 9}', {"inflight": 9}),  # duplicate keys: the last
        (b'{"inflight": 2, "' + b"k" * 100_000 + b'": 1}', {"inflight": 2}),  # a long key
    ],
)
def test_our_load_takes_only_counts_and_shares(
    body: bytes, report: dict[str, float] | None
) -> None:
    assert read_load(200, body, None) == (None if report is None else LoadReading(report))


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"inflight": 1, "x": "\xff\xfe"}',
        b'{"inflight": 1',
        b"<html><body><h1>It works!</h1></body></html>",
        b'{"inflight": ' + b"1" * 5000 + b"}",
        b"",
    ],
    ids=["deep", "not-utf8", "truncated", "html", "huge-int", "empty"],
)
def test_a_hostile_load_raises_one_of_the_probe_failures(body: bytes) -> None:
    with pytest.raises(PROBE_FAILURES):
        read_load(200, body, None)


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf", "-1", "1e400", "9007199254740993"])
def test_a_metric_that_is_no_count_is_skipped(value: str) -> None:
    page = f"# TYPE tgi_queue_size gauge\ntgi_queue_size {value}\n"
    assert read_load(200, page.encode(), PRESETS["tgi"]) is None


def test_a_hostile_metrics_page_costs_its_bad_lines_or_raises() -> None:
    tgi = recorded("tgi_metrics.txt")
    long_line = b"other_metric{" + b"a" * 100_000 + b'="x"} 1\n'  # skipped unparsed
    assert read_load(200, long_line + tgi, PRESETS["tgi"]) is not None
    assert read_load(200, b"\xff\xfe\x80 not UTF-8\n" + tgi, PRESETS["tgi"]) is not None
    html = b"<html><body>tgi_queue_size is 4</body></html>"
    assert read_load(200, html, PRESETS["tgi"]) is None
    truncated = recorded("vllm_metrics.txt")[:-40] + b"\n"
    reading = read_load(200, truncated, PRESETS["vllm"])
    assert reading is not None and reading.report["inflight"] == 19
    for malformed in (b"tgi_queue_size {{{ 1\n", b"tgi_queue_size 0x10\n"):
        with pytest.raises(PROBE_FAILURES):
            read_load(200, malformed, PRESETS["tgi"])
    cut_mid_sample = b'# TYPE tgi_queue_size gauge\ntgi_queue_size{le="0'
    with pytest.raises(PROBE_FAILURES):
        read_load(200, cut_mid_sample, PRESETS["tgi"])
