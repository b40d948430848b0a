"""Gateway configuration: one YAML file, validated fully into frozen models before any use.

`load_config(path)` is the only way config enters the program. Every error names the key path
and what was expected (`replicas[2].url: ...`), so a bad file is fixed from one line.
"""

from __future__ import annotations

import hashlib
import os
import re
import reprlib
import urllib.parse
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails
from yarl import URL

from gateway import yamlfile
from gateway.errors import ConfigError, key_path
from gateway.routing.options import AffinityOptions, PolicyOptions, PrefixOptions
from gateway.routing.policies import canonical_policy_name


def _replica_url(value: str) -> str:
    try:
        url = URL(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("expected an absolute http:// or https:// URL with a host")
    if url.query_string or url.fragment or url.user:
        raise ValueError("a replica URL takes no query, fragment or credentials")
    return str(url).rstrip("/")


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("expected a path starting with '/'")
    return value


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _from_environment(value: str) -> str:
    """`${NAME}` replaced by the gateway's environment variable NAME (a URL with a password
    can then live in a Kubernetes Secret, not in the config file)."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(
                f"${{{name}}} is not set in the gateway's environment (set it, e.g. from a "
                "Kubernetes Secret with env[].valueFrom.secretKeyRef)"
            )
        return os.environ[name]

    return ENV_REFERENCE.sub(lookup, value)


def _store_path(value: str) -> str:
    value = _from_environment(value)
    if not value.strip():
        raise ValueError(
            "expected a file path for an SQLite job store or a postgresql://user@host:port/db URL"
        )
    scheme, sep, _ = value.partition("://")
    if is_postgres_url(value):
        parts = urllib.parse.urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("the URL's port is not a number") from None
        if not parts.path.strip("/") and "dbname=" not in parts.query:
            raise ValueError(f"name the database: {scheme}://user@host:5432/DBNAME")
    elif sep and scheme.isalpha():
        raise ValueError(
            f"'{scheme}://' is not a job store: use postgresql://user@host:port/db or a file path"
        )
    return value


POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(store: str) -> bool:
    return store.partition("://")[0] in POSTGRES_SCHEMES and "://" in store


PASSWORD_PARAMETER = re.compile(r"(?i)(password=)([^&\s]*)")


def _url_password(value: str) -> str | None:
    """The password in a URL's user part, however it is written (unencoded '/', '#' or '@')."""
    _, sep, rest = value.partition("://")
    credentials, at, _ = rest.rpartition("@")
    return credentials.split(":", 1)[1] if sep and at and ":" in credentials else None


def redacted(value: str) -> str:
    """A URL (or libpq `key=value` string) as a message may show it: no password, in the user
    part or as `password=`; anything else unchanged."""
    password = _url_password(value)
    if password is not None:
        scheme, _, rest = value.partition("://")
        user, _, _ = rest.partition(":")
        value = f"{scheme}://{user}:***@{rest.rpartition('@')[2]}"
    return PASSWORD_PARAMETER.sub(r"\1***", value)


HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _sha256_hex(value: str) -> str:
    if not HEX_SHA256.fullmatch(value):
        raise ValueError("expected the key's SHA-256 as 64 hex digits (sha256sum of the key)")
    return value.lower()


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
    path: Annotated[str, AfterValidator(_absolute_path)] = "/load"  # /metrics but for infergate
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

    path: Annotated[str, AfterValidator(_absolute_path)] | None = "/v1/models"  # None: off
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


class ReplicaSpec(_Model):
    url: Annotated[str, AfterValidator(_replica_url)]
    # Requests this replica takes at once; more wait in the gateway queue (limits.max_queue).
    # Overrides limits.max_outstanding_per_replica, e.g. for a replica on a smaller GPU.
    max_concurrency: int | None = Field(None, ge=1)
    # The models it serves; when given, its GET /v1/models is not polled.
    models: tuple[Annotated[str, Field(min_length=1)], ...] | None = Field(None, min_length=1)


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
    path: Annotated[str, AfterValidator(_absolute_path)] = "/ping"
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
    store: Annotated[str, AfterValidator(_store_path)]
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


class ApiKey(_Model):
    """One client key: its name (the owner of its jobs, the `key` label of its metrics) and
    either the SHA-256 of the key (hex) or, for local use, the key itself."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")
    sha256: Annotated[str, AfterValidator(_sha256_hex)] | None = None
    key: str | None = Field(None, min_length=1)

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

    @property
    def replica_urls(self) -> list[str]:
        """The static list; empty when discovery finds the replicas."""
        return [spec.url for spec in self.replicas or ()]

    @property
    def replica_max_concurrency(self) -> dict[str, int | None]:
        return {spec.url: spec.max_concurrency for spec in self.replicas or ()}

    @property
    def replica_models(self) -> dict[str, tuple[str, ...] | None]:
        return {spec.url: spec.models for spec in self.replicas or ()}

    def policy_options(self) -> PolicyOptions:
        return PolicyOptions(
            feedback_max_age_s=self.load_feedback.max_age_s,
            ewma_decay_s=self.routing.ewma_decay_s,
            affinity=self.routing.affinity,
            prefix=self.routing.prefix,
        )


MAX_QUOTED_CHARS = 80  # of a value a config error quotes
MAX_PROBLEMS = 10  # listed in one error; the rest are counted


class _Quoted(reprlib.Repr):
    """A value as an error quotes it: a few items of a few levels, each string without its
    password, so the work and the message stay small whatever the value holds."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxother = 3, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 4

    def repr_str(self, x: str, level: int) -> str:
        return repr(_clip(redacted(x)))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


def _describe(error: ErrorDetails) -> str | None:
    kind, loc, msg = error["type"], tuple(error["loc"]), error["msg"]
    if kind == "extra_forbidden":
        return f"{key_path(loc)}: unknown key"
    if kind == "missing":
        return f"{key_path(loc)}: required key is missing"
    if kind == "too_short" and loc == ("replicas",):
        # pydantic also reports the length when an item failed; only an empty list is news.
        return None if error.get("input") else "replicas: at least one replica is required"
    msg = msg.removeprefix("Value error, ").replace("a valid tuple", "a list")
    msg = msg.replace("Tuple should", "List should")
    if not loc and ": " in msg:  # model-level validators already carry their path
        return msg
    if loc[:1] == ("auth",):  # never echo a key (or its digest) into a log line
        return f"{key_path(loc)}: {msg}"
    return f"{key_path(loc)}: {msg} (got {_clip(_Quoted().repr(error.get('input')))})"


def _secrets(data: Any) -> set[str]:
    """What no config message may show, wherever a value turns up again: URL passwords (also
    those `${NAME}` expands to) and the API keys and digests under `auth`."""
    found: set[str] = set()
    seen: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, under_auth = stack.pop()
        if isinstance(value, str):
            for text in (value, ENV_REFERENCE.sub(_variable_or_reference, value)):
                found.update(m.group(2) for m in PASSWORD_PARAMETER.finditer(text))
                found.add(_url_password(text) or "")
        elif id(value) not in seen and isinstance(value, dict | list | tuple):
            seen.add(id(value))
            pairs = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, item in pairs:
                if under_auth and key in ("key", "sha256") and isinstance(item, str):
                    found.add(item)
                stack.append((item, under_auth or key == "auth"))
    return {secret for secret in found if len(secret) >= 4}  # shorter: a quoted value hides it


def _variable_or_reference(match: re.Match[str]) -> str:
    return os.environ.get(match.group(1), match.group(0))


def _scrubbed(message: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def parse_config(data: Any) -> GatewayConfig:
    if data is None:
        raise ConfigError("(top level): the file is empty; expected a mapping with 'replicas'")
    if not isinstance(data, dict):
        raise ConfigError(f"(top level): expected a mapping, got {type(data).__name__}")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = [p for p in map(_describe, exc.errors()) if p]
        if len(problems) > MAX_PROBLEMS:
            problems[MAX_PROBLEMS:] = [f"and {len(problems) - MAX_PROBLEMS} more"]
        raise ConfigError(_scrubbed("; ".join(problems), _secrets(data))) from None


def load_config(path: str | Path) -> GatewayConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_config(yamlfile.load_yaml(text))
