"""The config schema: frozen pydantic models, `extra="forbid"`, units in names, the routing
options embedded as routing/options.py defines them."""

from __future__ import annotations

import hashlib
import re
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from yarl import URL

from gateway.config.values import (
    sha256_hex,
    valid_absolute_path,
    valid_limits_store,
    valid_replica_url,
    valid_store_path,
    valid_zmq_endpoint,
)
from gateway.routing.options import AffinityOptions, PolicyOptions, PrefixOptions
from gateway.routing.policies import canonical_policy_name
from gateway.routing.tokens import load_tokenizer


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Routing(_Model):
    strategy: Annotated[str, AfterValidator(canonical_policy_name)] = "least_outstanding_requests"
    seed: int | None = None  # fixes random tie-breaks and draws, for reproducible benchmarks
    affinity: AffinityOptions = AffinityOptions()
    ewma_decay_s: float = Field(10.0, gt=0)  # strategy peak_ewma
    prefix: PrefixOptions = PrefixOptions()
    # Each response says why it went where it went (X-Infergate-Decision); costs one more pass
    # over the candidates' costs per request.
    explain: bool = False


LoadSource = Literal["infergate", "vllm", "sglang", "tgi", "prometheus"]


class LoadMetrics(_Model):
    """Prometheus metric names read from a replica's /metrics (`source: prometheus`); each
    entry may list alternatives, the first one the replica exposes is used."""

    waiting: tuple[str, ...] = Field(min_length=1)  # requests queued at the engine
    running: tuple[str, ...] = Field(min_length=1)  # requests it is running
    kv_usage: tuple[str, ...] = ()  # KV cache in use, a share from 0 to 1

    @model_validator(mode="before")
    @classmethod
    def _one_name_is_a_list(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in data.items()}
        return data


class LoadFeedback(_Model):
    """Where each replica's load comes from. `infergate`: the X-Replica-Load header of every
    response and GET /load (our replica); `vllm`, `sglang`, `tgi`: the engine's documented
    Prometheus metrics on GET /metrics (gateway/control/engines.py); `prometheus`: the metric
    names in `metrics`. Strategy least_loaded, the jobs idle-capacity rule and the status page use
    reports no older than max_age_s."""

    source: LoadSource = "infergate"
    poll_interval_s: float = Field(0.5, ge=0)  # 0 turns polling off (headers still count)
    max_age_s: float = Field(2.0, gt=0)
    # GET /load for our replica, /metrics for the engines (the default follows `source`)
    path: Annotated[str, AfterValidator(valid_absolute_path)] = "/load"
    metrics: LoadMetrics | None = None  # only with source: prometheus

    @model_validator(mode="before")
    @classmethod
    def _path_of_source(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "path" not in data
            and data.get("source", "infergate") != "infergate"
        ):
            return {**data, "path": "/metrics"}
        return data

    @model_validator(mode="after")
    def _metrics_with_prometheus(self) -> LoadFeedback:
        if self.source == "prometheus" and self.metrics is None:
            raise ValueError(
                "load_feedback.metrics: required with source: prometheus, e.g. {waiting: "
                "vllm:num_requests_waiting, running: vllm:num_requests_running}"
            )
        if self.source != "prometheus" and self.metrics is not None:
            raise ValueError(
                f"load_feedback.metrics: only with source: prometheus (source {self.source} "
                "names its own metrics)"
            )
        return self


class ServedModels(_Model):
    """Which models each replica serves: its GET /v1/models (OpenAI's list), polled; a replica
    with `replicas[].models` in the config is not polled."""

    path: Annotated[str, AfterValidator(valid_absolute_path)] | None = "/v1/models"  # None: off
    interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)


class ModelRoute(_Model):
    """One entry of `models:`: an alias (`target`: the served model it stands for; the
    request's model is rewritten to it) or the strategy for a served model's requests."""

    name: str = Field(min_length=1, max_length=256)
    target: str | None = Field(None, min_length=1, max_length=256)
    strategy: Annotated[str, AfterValidator(canonical_policy_name)] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> ModelRoute:
        if (self.target is None) == (self.strategy is None):
            raise ValueError(
                f"model {self.name!r}: give either a 'target' (an alias) or a 'strategy' (for "
                "a served model; an alias's requests use its target's)"
            )
        if self.target == self.name:
            raise ValueError(f"model {self.name!r}: an alias cannot target itself")
        return self


class ReplicaEvents(_Model):
    """Where this replica publishes its KV cache events, when not at the fleet's
    `routing.prefix.events` port on its URL's host (data-parallel ranks: the ports after)."""

    endpoint: Annotated[str, AfterValidator(valid_zmq_endpoint)]
    replay_endpoint: Annotated[str, AfterValidator(valid_zmq_endpoint)] | None = None


class ReplicaSpec(_Model):
    url: Annotated[str, AfterValidator(valid_replica_url)]
    # Requests this replica takes at once; more wait in the gateway queue (limits.max_queue).
    # Overrides limits.max_outstanding_per_replica, e.g. for a replica on a smaller GPU.
    max_concurrency: int | None = Field(None, ge=1)
    # The models it serves; when given, its GET /v1/models is not polled.
    models: tuple[Annotated[str, Field(min_length=1)], ...] | None = Field(None, min_length=1)
    kv_events: ReplicaEvents | None = None  # precise_prefix on events: its own endpoints


class Timeouts(_Model):
    connect_s: float = Field(5.0, gt=0)
    first_byte_s: float = Field(300.0, gt=0)  # dispatch until the replica's response headers
    idle_s: float = Field(300.0, gt=0)  # longest silence between two upstream chunks
    total_s: float | None = Field(None, gt=0)
    client_body_s: float = Field(30.0, gt=0)  # reading the client's request body
    # An idle upstream connection older than this is closed, not reused: below the 5 s after
    # which uvicorn-based engines (vLLM, SGLang) close theirs, so a request never meets one
    # the replica is closing.
    upstream_keepalive_s: float = Field(4.0, gt=0)


RetryOn = Literal["connect_error", "reset", "timeout", "429", "503"]


class Retries(_Model):
    """Retry on another replica, only while no response byte has reached the client."""

    max_attempts: int = Field(3, ge=1)  # tries per request, the first one included
    retry_on: tuple[RetryOn, ...] = ("connect_error", "reset", "timeout", "429", "503")
    budget_percent: float = Field(50.0, ge=0, le=100)  # retries in flight / requests in flight
    min_retry_concurrency: int = Field(10, ge=0)  # retries always allowed up to this many


class OutlierDetection(_Model):
    """Passive ejection: consecutive connect errors, resets, timeouts or 5xx take a replica out
    of rotation for base_ejection_s x (times ejected), capped."""

    consecutive_failures: int = Field(5, ge=1)
    base_ejection_s: float = Field(5.0, gt=0)
    max_ejection_s: float = Field(300.0, gt=0)
    max_ejected_percent: float = Field(50.0, ge=0, le=100)
    # A 500 (or any 5xx but 502/503/504) can be the request's fault (input the replica could not
    # handle): by default only what says the replica itself is unwell counts, that is connect
    # errors, resets, timeouts, 502, 503 and 504 (Envoy's gateway failures). True: every 5xx.
    count_5xx: bool = False


Engine = Literal["infergate", "vllm", "sglang", "tgi", "triton"]
HEALTH_PATHS: dict[str, str] = {
    "infergate": "/ping", "vllm": "/health", "sglang": "/health", "tgi": "/health",
    "triton": "/v2/health/ready",
}  # fmt: skip


class HealthCheck(_Model):
    """`engine` presets the path its servers answer when `path` is not given."""

    engine: Engine = "infergate"
    path: Annotated[str, AfterValidator(valid_absolute_path)] = "/ping"
    interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    healthy_threshold: int = Field(1, ge=1)
    unhealthy_threshold: int = Field(2, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _path_of_engine(cls, data: Any) -> Any:
        engine = data.get("engine") if isinstance(data, dict) else None
        if isinstance(engine, str) and engine in HEALTH_PATHS and "path" not in data:
            return {**data, "path": HEALTH_PATHS[engine]}
        return data


class Limits(_Model):
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_outstanding: int | None = Field(None, ge=1)  # gateway-wide requests in flight
    max_outstanding_per_replica: int | None = Field(None, ge=1)
    max_queue: int = Field(0, ge=0)  # requests waiting at the gateway for a free slot
    queue_timeout_s: float = Field(5.0, gt=0)
    # Read at start-up only (they shape the HTTP server):
    max_header_bytes: int = Field(32 * 1024, ge=1024)  # one header line, and the request line
    client_keepalive_s: float = Field(75.0, gt=0)  # idle client connections are closed after
    max_connections: int | None = Field(None, ge=1)  # open client connections


def _nameserver(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:53")
    return value


class Discovery(_Model):
    """Replicas from DNS: every A/AAAA address of `dns` becomes scheme://ADDRESS:port (as a
    Kubernetes headless Service gives). Re-resolved every interval_s; a failed or empty answer
    keeps the last good list."""

    dns: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)  # one resolution, all tries included
    scheme: Literal["http", "https"] = "http"
    nameserver: Annotated[str, AfterValidator(_nameserver)] | None = None  # None: the system's


class Ui(_Model):
    enabled: bool = True  # the read-only status page at /ui (no secrets; replica URLs and counts)


class Reload(_Model):
    watch: bool = True  # poll the file's mtime and reload on change
    poll_interval_s: float = Field(1.0, gt=0)


class Jobs(_Model):
    """Deferred inference (gateway/jobs/): durable jobs and batch files run in idle capacity."""

    # An SQLite file (one gateway) or a postgresql:// URL (several); read at start-up only.
    # `${NAME}` in it is the environment variable NAME.
    store: Annotated[str, AfterValidator(valid_store_path)]
    # PostgreSQL: a claim a gateway stops renewing (it died) runs out after this long and the
    # job is queued again; renewed every lease_s / 3.
    lease_s: float = Field(30.0, ge=1.0)
    max_outstanding_per_replica: int = Field(1, ge=1)  # spare capacity: dispatch only below it
    max_attempts: int = Field(3, ge=1)  # tries per job on replica errors, the first included
    result_retention_s: float = Field(7 * 24 * 3600.0, gt=0)  # finished jobs and batches
    max_batch_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_batch_lines: int = Field(50_000, ge=1)
    # Storage quota per API key (jobs and batch inputs and results it holds); None = no quota.
    max_bytes_per_key: int | None = Field(256 * 1024 * 1024, ge=1)
    max_lines_per_key: int | None = Field(200_000, ge=1)
    poll_interval_s: float = Field(0.02, gt=0)  # capacity check while jobs wait for a slot


NAME_PATTERN = r"^[A-Za-z0-9_.:@-]+$"  # key, tenant and class names: safe in a header and a label


class KeyLimits(_Model):
    """One key's limits (gateway/flow/limits.py): each a token bucket that holds one minute's
    worth and refills continuously, exact across workers. None: no limit of that kind."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)  # prompt + completion
    max_parallel: int | None = Field(None, ge=1)  # requests in flight (queued ones included)
    # Reserved for the completion of a request that names no max_tokens, until its usage
    # settles the reservation.
    default_max_tokens: int = Field(256, ge=1)


class ApiKey(_Model):
    """One client key: its name (the owner of its jobs, the `key` label of its metrics) and
    either the SHA-256 of the key (hex) or, for local use, the key itself; under flow control,
    its tenant, the most important class it may use and its share; its limits."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    sha256: Annotated[str, AfterValidator(sha256_hex)] | None = None
    key: str | None = Field(None, min_length=1)
    tenant: str | None = Field(None, min_length=1, max_length=64, pattern=NAME_PATTERN)
    class_: str | None = Field(None, alias="class")  # None: flow_control.default_class
    weight: float = Field(1.0, gt=0, le=1e6)  # its tenant's share under fairness
    limits: KeyLimits | None = None

    @property
    def tenant_name(self) -> str:
        return self.tenant or self.name

    @model_validator(mode="after")
    def _one_form(self) -> ApiKey:
        if (self.sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of 'sha256' (the key's hex digest) or 'key'")
        return self

    @cached_property
    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.encode()).digest()


class FlowClass(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    # Its queued requests are the first to go when the queue is full (the newest first);
    # a request of a class that is not sheddable is refused instead, never taken out.
    sheddable: bool = False


Fairness = Literal["fcfs", "round_robin", "tokens"]


class FlowControl(_Model):
    """Requests wait at the gateway for a replica slot (gateway/flow/): strictly by class, most
    important first; within a class by `fairness` between tenants; within a tenant in order.
    With it on, the queue's bounds are its own (`max_queued`, `queue_ttl_s`), not
    `limits.max_queue` and `limits.queue_timeout_s`."""

    classes: tuple[FlowClass, ...] = Field((FlowClass(name="standard"),), min_length=1)
    default_class: str | None = None  # the class of a request that names none; None: the last
    # fcfs: arrival order; round_robin: tenants in turn; tokens: the tenant with the fewest
    # weighted tokens served lately (output tokens count output_token_weight times) first
    fairness: Fairness = "tokens"
    output_token_weight: float = Field(2.0, ge=0, le=1000)
    fairness_half_life_s: float = Field(60.0, gt=0)  # tokens served count half after this
    queue_ttl_s: float = Field(60.0, gt=0)  # longer in the queue: 429 ttl-expired
    max_queued: int = Field(5000, ge=0)  # requests waiting at once, every class together
    # A share of each replica's slots kept for the most important class: the other classes
    # fill a replica only up to (100 - reserve_percent)% of its slots (one at least), so a
    # request of the first class finds a slot at once instead of waiting for one to free.
    # 0: every slot goes to whoever waits (work-conserving).
    reserve_percent: float = Field(0.0, ge=0, lt=100)
    # Engines that report no capacity (vLLM, SGLang, TGI through load_feedback) take another
    # request while their reported waiting queue is empty and their KV cache use below this.
    kv_usage_threshold: float = Field(0.9, gt=0, le=1)
    # Several gateways: the keys' limits are leased from this PostgreSQL database in slices
    # (gateway/control/limits_store.py); `${NAME}` is the environment variable NAME. Read at
    # start-up only. None: this gateway's limits are its own.
    store: Annotated[str, AfterValidator(valid_limits_store)] | None = None
    store_unavailable: Literal["allow", "deny"] = "allow"  # while the store cannot be reached
    # A slice: this share of a key's per-minute limit, leased by one gateway at a time.
    store_slice_percent: float = Field(5.0, gt=0, le=50)

    @model_validator(mode="after")
    def _known_default(self) -> FlowControl:
        names = [c.name for c in self.classes]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise ValueError(
                    f"classes[{i}].name: {name!r} is also classes[{names.index(name)}]"
                )
        if self.default_class is not None and self.default_class not in names:
            raise ValueError(
                f"default_class: {self.default_class!r} is not one of the classes "
                f"({', '.join(names)})"
            )
        return self

    @property
    def default(self) -> str:
        return self.default_class or self.classes[-1].name

    def rank(self, name: str) -> int:
        """The class's place, 0 the most important; -1 when there is no such class."""
        return next((i for i, c in enumerate(self.classes) if c.name == name), -1)


OTEL_EXTRA = "pip install 'infergate[otel]'"


def otel_missing() -> bool:
    """The `otel` extra is not installed (found without importing the SDK or the exporter)."""
    import importlib.util

    names = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
    try:
        return any(importlib.util.find_spec(name) is None for name in names)
    except ImportError:
        return True


def otlp_endpoint(value: str) -> str:
    """An OTLP/HTTP traces URL; one with no path gets the collector's /v1/traces."""
    try:
        url = URL(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            "expected an http:// or https:// URL, e.g. http://127.0.0.1:4318/v1/traces"
        )
    if url.query_string or url.fragment:
        raise ValueError("an OTLP endpoint takes no query or fragment")
    return str(url.with_path("/v1/traces")) if url.path in ("", "/") else str(url)


class Tracing(_Model):
    """OpenTelemetry traces (gateway/ops/tracing.py; needs the `otel` extra), exported over
    OTLP/HTTP (protobuf) in batches: a span for each proxied request, its routing decision and
    queue wait, and each attempt on a replica, which gets the attempt's `traceparent`. A client's
    `traceparent` is the parent, its sampled flag honoured; else `sample_ratio` of the traces are
    kept. Read at start-up only: a reload does not change it. The batch processor's own knobs
    are the SDK's environment variables (OTEL_BSP_SCHEDULE_DELAY, ...)."""

    otlp_endpoint: Annotated[str, AfterValidator(otlp_endpoint)]
    sample_ratio: float = Field(1.0, ge=0, le=1)  # traces kept when the client decided none
    service_name: str = Field("infergate-gateway", min_length=1, max_length=256)

    @model_validator(mode="after")
    def _extra_installed(self) -> Tracing:
        if otel_missing():
            raise ValueError(f"needs the OpenTelemetry packages: {OTEL_EXTRA}")
        return self


class Auth(_Model):
    """When present, every proxied and jobs request needs `Authorization: Bearer <key>`."""

    api_keys: tuple[ApiKey, ...] = Field(min_length=1)


class GatewayConfig(_Model):
    listen: Listen = Listen()
    # Gateway processes sharing the port and exact counts (gateway/app/workers.py); start-up only.
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    routing: Routing = Routing()
    # Exactly one of the two: a static list, or DNS discovery (which then owns the list).
    replicas: tuple[ReplicaSpec, ...] | None = Field(None, min_length=1)
    discovery: Discovery | None = None
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection | None = OutlierDetection()
    limits: Limits = Limits()
    load_feedback: LoadFeedback = LoadFeedback()
    served_models: ServedModels = ServedModels()
    models: tuple[ModelRoute, ...] = ()  # aliases and per-model strategies
    reload: Reload = Reload()
    ui: Ui = Ui()
    auth: Auth | None = None  # None: anyone who reaches the gateway may use it (local use)
    flow_control: FlowControl | None = None  # None: one FIFO queue, as limits configure it
    tracing: Tracing | None = None  # None: no traces, no OpenTelemetry module loaded

    @model_validator(mode="after")
    def _one_replica_source(self) -> GatewayConfig:
        if self.replicas is None and self.discovery is None:
            raise ValueError("replicas: required key is missing (or give 'discovery' instead)")
        if self.replicas is not None and self.discovery is not None:
            raise ValueError("discovery: give either 'replicas' or 'discovery', not both")
        return self

    jobs: Jobs | None = None  # off unless configured: it needs a durable store path

    @model_validator(mode="after")
    def _unique_replicas(self) -> GatewayConfig:
        seen: set[str] = set()
        for i, spec in enumerate(self.replicas or ()):
            if spec.url in seen:
                raise ValueError(f"replicas[{i}].url: {spec.url} is listed twice")
            seen.add(spec.url)
        return self

    @model_validator(mode="after")
    def _unique_models(self) -> GatewayConfig:
        names: dict[str, int] = {}
        for i, route in enumerate(self.models):
            if route.name in names:
                raise ValueError(
                    f"models[{i}].name: {route.name!r} is also models[{names[route.name]}]"
                )
            names[route.name] = i
        for i, route in enumerate(self.models):
            target = self.models[names[route.target]] if route.target in names else None
            if target is not None and target.target is not None:
                raise ValueError(
                    f"models[{i}].target: {route.target!r} is itself an alias; name the "
                    "served model"
                )
        return self

    @model_validator(mode="after")
    def _unique_keys(self) -> GatewayConfig:
        names: dict[str, int] = {}
        digests: dict[bytes, int] = {}
        for i, key in enumerate(self.auth.api_keys if self.auth else ()):
            where = f"auth.api_keys[{i}]"
            if key.name in names:
                raise ValueError(
                    f"{where}.name: {key.name!r} is also auth.api_keys[{names[key.name]}]"
                )
            if key.digest in digests:
                raise ValueError(f"{where}: the same key as auth.api_keys[{digests[key.digest]}]")
            names[key.name], digests[key.digest] = i, i
        return self

    @model_validator(mode="after")
    def _key_tenancy(self) -> GatewayConfig:
        weights: dict[str, tuple[float, int]] = {}
        for i, key in enumerate(self.auth.api_keys if self.auth else ()):
            where = f"auth.api_keys[{i}]"
            if key.class_ is not None:
                if self.flow_control is None:
                    raise ValueError(f"{where}.class: only with a flow_control section")
                if self.flow_control.rank(key.class_) < 0:
                    names = ", ".join(c.name for c in self.flow_control.classes)
                    raise ValueError(
                        f"{where}.class: {key.class_!r} is not one of flow_control.classes "
                        f"({names})"
                    )
            seen = weights.setdefault(key.tenant_name, (key.weight, i))
            if seen[0] != key.weight:
                raise ValueError(
                    f"{where}.weight: {key.weight} differs from auth.api_keys[{seen[1]}] of the "
                    f"same tenant {key.tenant_name!r} ({seen[0]}); a tenant has one weight"
                )
        return self

    @property
    def replica_urls(self) -> list[str]:
        """The static list; empty when discovery finds the replicas."""
        return [spec.url for spec in self.replicas or ()]

    @property
    def replica_max_concurrency(self) -> dict[str, int | None]:
        return {spec.url: spec.max_concurrency for spec in self.replicas or ()}

    @property
    def replica_events(self) -> dict[str, ReplicaEvents | None]:
        return {spec.url: spec.kv_events for spec in self.replicas or ()}

    @property
    def replica_models(self) -> dict[str, tuple[str, ...] | None]:
        return {spec.url: spec.models for spec in self.replicas or ()}

    def policy_options(self) -> PolicyOptions:
        return PolicyOptions(
            feedback_max_age_s=self.load_feedback.max_age_s,
            ewma_decay_s=self.routing.ewma_decay_s,
            affinity=self.routing.affinity,
            prefix=self.routing.prefix,
            tokenizer=load_tokenizer(self.routing.prefix.tokenizer),
        )
