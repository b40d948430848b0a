"""Engine load feedback: each engine's documented metrics read into a load report, and the
config that names them."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, LoadFeedback, parse_config
from gateway.control.engines import PRESETS, metric_names, scrape_report

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 12.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.42
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 123456.0
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",tp_rank="0"} 3.0
sglang:num_running_reqs{model_name="qwen",tp_rank="1"} 3.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen",tp_rank="0"} 2.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen",tp_rank="0"} 0.25
"""

TGI = """\
# TYPE tgi_queue_size gauge
tgi_queue_size 4
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 9
"""


def test_vllm_metrics_become_a_load_report_with_the_model_label_kept() -> None:
    scrape = scrape_report(VLLM, PRESETS["vllm"])
    assert scrape is not None
    assert scrape.report == {"queued": 12, "running": 7, "inflight": 19, "kv_usage": 0.42}
    assert scrape.by_model == {"meta-llama/Llama-3.1-8B": 19}


def test_sglang_sums_over_ranks_and_tgi_has_no_labels_or_kv() -> None:
    scrape = scrape_report(SGLANG, PRESETS["sglang"])  # two TP ranks of one engine: one batch
    assert scrape is not None and scrape.report == {
        "queued": 2, "running": 3, "inflight": 5, "kv_usage": 0.25,
    }  # fmt: skip
    two_engines = VLLM + (
        'vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B"} 5.0\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B"} 0.6\n'
    )
    scrape = scrape_report(two_engines, PRESETS["vllm"])  # data parallel: two batches
    assert scrape is not None and scrape.report["running"] == 12
    assert scrape.report["kv_usage"] == 0.6  # the fullest, not a sum
    scrape = scrape_report(TGI, PRESETS["tgi"])
    assert scrape is not None and scrape.report == {"queued": 4, "running": 9, "inflight": 13}
    assert scrape.by_model == {"": 13}


def test_older_vllm_kv_metric_and_two_models_sum_into_one_report() -> None:
    text = VLLM.replace("kv_cache_usage_perc", "gpu_cache_usage_perc") + (
        'vllm:num_requests_waiting{engine="0",model_name="adapter"} 3.0\n'
    )
    scrape = scrape_report(text, PRESETS["vllm"])
    assert scrape is not None
    assert scrape.report["queued"] == 15 and scrape.report["kv_usage"] == 0.42
    assert scrape.by_model == {"adapter": 3, "meta-llama/Llama-3.1-8B": 19}


def test_an_exposition_without_the_engine_metrics_is_no_report() -> None:
    assert scrape_report(TGI, PRESETS["vllm"]) is None
    assert scrape_report("", PRESETS["tgi"]) is None
    for bad in ("NaN", "+Inf", "-1", "1e400"):
        text = f"# TYPE tgi_queue_size gauge\ntgi_queue_size {bad}\n"
        assert scrape_report(text, PRESETS["tgi"]) is None, bad
    huge = "other_metric{" + "a" * 100_000 + '="x"} 1\n' + TGI  # skipped unparsed
    scrape = scrape_report(huge, PRESETS["tgi"])
    assert scrape is not None and scrape.report["inflight"] == 13


def test_a_malformed_exposition_raises_value_error_for_the_poller_to_ignore() -> None:
    with pytest.raises(ValueError):
        scrape_report("tgi_queue_size {{{ 1\n", PRESETS["tgi"])


def test_custom_prometheus_names_and_the_config_rules() -> None:
    feedback = LoadFeedback.model_validate(
        {"source": "prometheus", "metrics": {"waiting": "q", "running": ["r", "r2"]}}
    )
    names = metric_names(feedback)
    assert names is not None and names.waiting == ("q",) and names.running == ("r", "r2")
    assert feedback.path == "/metrics"
    scrape = scrape_report("# TYPE r2 gauge\nr2 5\n", names)
    assert scrape is not None and scrape.report["inflight"] == 5
    assert metric_names(LoadFeedback()) is None and LoadFeedback().path == "/load"
    assert LoadFeedback.model_validate({"source": "tgi", "path": "/m"}).path == "/m"
    with pytest.raises(ConfigError, match=r"load_feedback\.metrics: required with source"):
        parse_config({"replicas": [{"url": "http://a"}], "load_feedback": {"source": "prometheus"}})
    with pytest.raises(ConfigError, match="only with source: prometheus"):
        parse_config(
            {
                "replicas": [{"url": "http://a"}],
                "load_feedback": {"source": "vllm", "metrics": {"waiting": "a", "running": "b"}},
            }
        )


def test_health_check_paths_follow_the_engine_unless_given() -> None:
    def path(check: dict[str, object]) -> str:
        config = parse_config({"replicas": [{"url": "http://a"}], "health_check": check})
        assert config.health_check is not None
        return config.health_check.path

    assert path({}) == "/ping"
    assert path({"engine": "vllm"}) == path({"engine": "tgi"}) == "/health"
    assert path({"engine": "triton"}) == "/v2/health/ready"
    assert path({"engine": "sglang", "path": "/ready"}) == "/ready"
    with pytest.raises(ConfigError, match=r"health_check\.engine"):
        path({"engine": "nginx"})
