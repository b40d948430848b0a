"""Locust users for the routing benchmark: OpenAI completions (plain and streamed) and KServe v2.

Against `make run` (`infergate up`: the gateway on port 8080, two replicas, default models):

    locust -f loadtests/load/locustfile.py --headless -u 8 -r 8 -t 10s --host http://127.0.0.1:8080
    locust -f loadtests/load/locustfile.py --host http://127.0.0.1:8080   # web UI on :8089

Streamed completions report time to first token as its own Locust event ("TTFT"). Besides
Locust's own (bucketed) statistics, every request is kept as a raw sample and written as CSV to
$INFERGATE_BENCH_SAMPLES when the run ends: the benchmark computes percentiles from those.
The workload (seed, output-length distribution, stream share) comes from
$INFERGATE_BENCH_WORKLOAD (JSON) when the benchmark runs it; run by hand it is the default one
fitted to the model `make run` serves (max_tokens up to 256 within a 512-token context), so every
request is one that model accepts. See loadtests/load/workload.py.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from locust import HttpUser, constant, events, task

from loadtests.load.samples import Sample, write_samples
from loadtests.load.sse import StreamCheck
from loadtests.load.workload import CompletionRequest, Workload, draw, user_rng

WORKLOAD = Workload.from_env()

SAMPLES: list[Sample] = []
HOSTS = [h for h in os.environ.get("INFERGATE_BENCH_HOSTS", "").split(",") if h]
_user_index = itertools.count()


def record(
    kind: str,
    start: float,
    ok: bool,
    status: int,
    latency_s: float,
    ttft_s: float | None,
    tokens: int,
    replica: str,
) -> None:
    SAMPLES.append(
        Sample(start, start + latency_s, kind, ok, status, latency_s, ttft_s, tokens, replica)
    )


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def save_samples(environment: Any, **_: Any) -> None:
    path = os.environ.get("INFERGATE_BENCH_SAMPLES")
    if path:
        write_samples(path, SAMPLES)


class CompletionUser(HttpUser):
    """Closed loop: each user sends its next request as soon as the last one ended."""

    wait_time = constant(float(os.environ.get("INFERGATE_BENCH_THINK_S", "0")))

    def on_start(self) -> None:
        index = next(_user_index)
        self.rng = user_rng(WORKLOAD, index)
        if HOSTS:  # several front ends (two gateways): users split evenly among them
            self.client.base_url = HOSTS[index % len(HOSTS)]

    @task
    def complete(self) -> None:
        request = draw(WORKLOAD, self.rng)
        if request.stream:
            self._streamed(request)
        else:
            self._plain(request)

    def _plain(self, request: CompletionRequest) -> None:
        start_unix, t0 = time.time(), time.perf_counter()
        body = request.body(WORKLOAD.model, WORKLOAD.seed)
        with self.client.post(
            "/v1/completions", json=body, name="completion", catch_response=True
        ) as response:
            latency = time.perf_counter() - t0
            ok = response.status_code == 200
            tokens = response.json()["usage"]["completion_tokens"] if ok else 0
            if not ok:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            replica = response.headers.get("X-Infergate-Replica", "")
        record("completion", start_unix, ok, response.status_code, latency, None, tokens, replica)

    def _streamed(self, request: CompletionRequest) -> None:
        """A stream counts as served only when it ends with `[DONE]` and has no error event."""
        start_unix, t0 = time.time(), time.perf_counter()
        body = request.body(WORKLOAD.model, WORKLOAD.seed)
        ttft: float | None = None
        check = StreamCheck()
        with self.client.post(
            "/v1/completions",
            json=body,
            name="completion (stream)",
            stream=True,
            catch_response=True,
        ) as response:
            replica = response.headers.get("X-Infergate-Replica", "")
            if response.status_code == 200:
                for line in response.iter_lines():
                    if check.feed(line) and ttft is None:
                        ttft = time.perf_counter() - t0
                        self._report_ttft(ttft)
                    if check.done:
                        break
            latency = time.perf_counter() - t0
            ok = response.status_code == 200 and check.ok
            if not ok:
                response.failure(
                    f"HTTP {response.status_code}, [DONE]: {check.done}, error: {check.error}"
                )
        record(
            "completion_stream",
            start_unix,
            ok,
            response.status_code,
            latency,
            ttft,
            check.tokens,
            replica,
        )

    def _report_ttft(self, ttft_s: float) -> None:
        self.environment.events.request.fire(
            request_type="TTFT",
            name="time to first token",
            response_time=ttft_s * 1000,
            response_length=0,
            exception=None,
            context={},
        )


class KServeUser(HttpUser):
    """KServe v2 / Triton REST inference on the `classifier` model."""

    wait_time = constant(float(os.environ.get("INFERGATE_BENCH_THINK_S", "0")))
    input_size = int(os.environ.get("INFERGATE_BENCH_INPUT_SIZE", "1024"))

    def on_start(self) -> None:
        index = next(_user_index)
        self.rng = user_rng(WORKLOAD, index)
        if HOSTS:  # several front ends (two gateways): users split evenly among them
            self.client.base_url = HOSTS[index % len(HOSTS)]

    @task
    def infer(self) -> None:
        data = [round(self.rng.uniform(-1, 1), 4) for _ in range(self.input_size)]
        body = {
            "inputs": [
                {"name": "input", "shape": [1, self.input_size], "datatype": "FP32", "data": data}
            ]
        }
        start_unix, t0 = time.time(), time.perf_counter()
        with self.client.post(
            "/v2/models/classifier/infer", json=body, name="v2 infer", catch_response=True
        ) as response:
            latency = time.perf_counter() - t0
            ok = response.status_code == 200
            if not ok:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            replica = response.headers.get("X-Infergate-Replica", "")
        record("v2_infer", start_unix, ok, response.status_code, latency, None, 0, replica)
