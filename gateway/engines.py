"""The engines people run behind the gateway, as their servers document them: which Prometheus
metrics say how loaded a replica is, and how a scrape becomes a load report.

    vLLM    vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc
            (vllm:gpu_cache_usage_perc before v0.10); label model_name
    SGLang  sglang:num_queue_reqs, sglang:num_running_reqs, sglang:token_usage; label model_name
    TGI     tgi_queue_size, tgi_batch_current_size; one model per server, no label

A report has the keys our replica's GET /load uses: `queued`, `running`, `inflight` (their sum)
and `kv_usage` when the engine has it, summed over the engine's model labels (one engine's
slots are shared by its models and LoRA adapters); the requests per model label are kept beside
it for the status page.
The exposition is parsed with prometheus-client's parser, never by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from gateway.config import LoadFeedback

MODEL_LABEL = "model_name"  # vLLM's and SGLang's


@dataclass(frozen=True)
class LoadMetricNames:
    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...] = ()


PRESETS: dict[str, LoadMetricNames] = {
    "vllm": LoadMetricNames(
        ("vllm:num_requests_waiting",),
        ("vllm:num_requests_running",),
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    "sglang": LoadMetricNames(
        ("sglang:num_queue_reqs",), ("sglang:num_running_reqs",), ("sglang:token_usage",)
    ),
    "tgi": LoadMetricNames(("tgi_queue_size",), ("tgi_batch_current_size",)),
}


def metric_names(feedback: LoadFeedback) -> LoadMetricNames | None:
    """The metrics a `load_feedback` config reads; None for our own JSON /load."""
    if feedback.metrics is not None:
        m = feedback.metrics
        return LoadMetricNames(m.waiting, m.running, m.kv_usage)
    return PRESETS.get(feedback.source)


@dataclass(frozen=True)
class Scrape:
    report: dict[str, float]  # queued, running, inflight, kv_usage: as GET /load's keys
    by_model: dict[str, int]  # requests in flight per model label ('' without one)


def scrape_report(text: str, names: LoadMetricNames) -> Scrape | None:
    """A load report from a /metrics exposition; None when it has neither the waiting nor the
    running metric (not this engine, or not ready yet)."""
    wanted = {*names.waiting, *names.running, *names.kv_usage}
    values: dict[str, dict[str, float]] = {}  # metric -> model label -> value
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.value == sample.value:  # not NaN
                model = sample.labels.get(MODEL_LABEL, "")
                per_model = values.setdefault(sample.name, {})
                per_model[model] = per_model.get(model, 0.0) + sample.value

    def first(options: tuple[str, ...]) -> dict[str, float]:
        return next((values[name] for name in options if name in values), {})

    waiting, running, kv = first(names.waiting), first(names.running), first(names.kv_usage)
    if not waiting and not running:
        return None
    queued, busy = sum(waiting.values()), sum(running.values())
    report: dict[str, float] = {
        "queued": int(queued), "running": int(busy), "inflight": int(queued + busy),
    }  # fmt: skip
    if kv:
        report["kv_usage"] = round(min(1.0, max(0.0, *kv.values())), 6)
    models = {*waiting, *running}
    by_model = {m: int(waiting.get(m, 0) + running.get(m, 0)) for m in sorted(models)}
    return Scrape(report, by_model)
