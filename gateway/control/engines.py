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
RANKS = frozenset({"tp_rank", "pp_rank"})  # ranks of one engine, reporting the same batch
MAX_LINE_CHARS = 4096  # a longer line is no load metric (and would cost the parser dearly)


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
    running metric (not this engine, or not ready yet). Only the wanted families' lines are
    parsed (an engine's page is mostly histograms), and values that are not finite counts are
    skipped. Series that differ only in a rank label of one parallel engine (`tp_rank`,
    `pp_rank`: every rank reports the same batch) count once; others (data-parallel engines,
    model labels) add up. KV usage is the fullest one."""
    wanted = {*names.waiting, *names.running, *names.kv_usage}
    values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}  # metric -> series -> v
    for family in text_string_to_metric_families(_lines_of(text, wanted)):
        for sample in family.samples:
            if sample.name in wanted and 0 <= sample.value < 2**53:  # NaN and inf fail too
                key = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in RANKS))
                series = values.setdefault(sample.name, {})
                series[key] = max(series.get(key, 0.0), sample.value)

    def first(options: tuple[str, ...]) -> dict[tuple[tuple[str, str], ...], float]:
        return next((values[name] for name in options if name in values), {})

    waiting, running, kv = first(names.waiting), first(names.running), first(names.kv_usage)
    if not waiting and not running:
        return None
    queued, busy = int(sum(waiting.values())), int(sum(running.values()))
    report: dict[str, float] = {"queued": queued, "running": busy, "inflight": queued + busy}
    if kv:
        report["kv_usage"] = round(min(1.0, max(kv.values())), 6)
    by_model: dict[str, int] = {}
    for series in (waiting, running):
        for key, value in series.items():
            model = dict(key).get(MODEL_LABEL, "")
            by_model[model] = by_model.get(model, 0) + int(value)
    return Scrape(report, dict(sorted(by_model.items())))


def _lines_of(text: str, wanted: set[str]) -> str:
    """The exposition's lines for the wanted metrics (their samples and # HELP / # TYPE)."""
    kept = []
    for line in text.splitlines():
        if len(line) > MAX_LINE_CHARS:
            continue
        name = line[7:] if line.startswith(("# HELP ", "# TYPE ")) else line
        end = min((i for i in (name.find("{"), name.find(" ")) if i >= 0), default=len(name))
        if name[:end] in wanted:
            kept.append(line)
    return "\n".join(kept) + "\n"
