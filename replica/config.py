"""Replica configuration: frozen pydantic models, `load_config(path)`, errors that name a key path.

Config enters the replica only through `load_config` / `parse_config`; everything downstream
receives these immutable objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from yarl import URL

from gateway import errors as gateway_errors
from gateway.yamlfile import load_yaml
from replica.errors import format_validation_error


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key path."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=9000, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    client_body_s: float = Field(default=30.0, gt=0)  # the most a request body may take to arrive


class EngineConfig(_Frozen):
    kind: Literal["torch", "simulated"] = "torch"
    device: str = "auto"
    profile_path: Path | None = None  # simulated engine; None = built-in 7B/A10G profile
    torch_threads: int | None = Field(default=None, gt=0)
    # Test hook (replica/engines/faults.py): every Nth generation step raises. Never in production.
    fail_every_n_steps: int | None = Field(default=None, gt=0)


class _QueueKnobs(_Frozen):
    max_queue: int = Field(default=256, gt=0)
    queue_timeout_ms: float = Field(default=30_000.0, gt=0)


class NoneBatcherConfig(_QueueKnobs):
    kind: Literal["none"]


class StaticBatcherConfig(_QueueKnobs):
    kind: Literal["static"]
    batch_size: int = Field(default=8, gt=0)
    max_wait_ms: float | None = Field(default=None, gt=0)  # starvation guard; None = wait forever


class DynamicBatcherConfig(_QueueKnobs):
    kind: Literal["dynamic"]
    max_batch_size: int = Field(default=32, gt=0)
    max_wait_ms: float = Field(default=5.0, ge=0)


class PrefixCacheConfig(_Frozen):
    enabled: bool = True
    block_size: int | None = Field(default=None, gt=0, le=1024)  # None: the profile's, else 16


class ContinuousBatcherConfig(_QueueKnobs):
    kind: Literal["continuous"]
    max_num_seqs: int = Field(default=16, gt=0)
    # Token budget per step: decodes first, the rest prefills (chunked). At least max_num_seqs.
    max_batch_tokens: int = Field(default=2048, gt=0)
    # KV memory in tokens; None: the simulated profile's, or max_num_seqs full contexts (torch).
    kv_capacity_tokens: int | None = Field(default=None, gt=0)
    prefix_cache: PrefixCacheConfig = PrefixCacheConfig()

    @model_validator(mode="after")
    def _budget_holds_every_decode(self) -> ContinuousBatcherConfig:
        if self.max_batch_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}): every running sequence decodes one token per step"
            )
        return self


BatcherConfig = Annotated[
    NoneBatcherConfig | StaticBatcherConfig | DynamicBatcherConfig | ContinuousBatcherConfig,
    Field(discriminator="kind"),
]


class KvEventsConfig(_Frozen):
    """vLLM's `--kv-events-config` fields and defaults (replica/kv_events.py), plus `form`."""

    enable_kv_cache_events: bool = False
    publisher: Literal["null", "zmq"] | None = None  # None: "zmq" when enabled, as vLLM
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = Field(default=10_000, gt=0)
    hwm: int = Field(default=100_000, ge=0)
    max_queue_size: int = Field(default=100_000, gt=0)
    topic: str = ""
    # "map": events as vLLM sends them now (tagged maps); "array": the older positional arrays.
    form: Literal["map", "array"] = "map"
    # Ours too: True binds the PUB at `endpoint` as given (tcp://127.0.0.1:5557: loopback only,
    # where vLLM's rule would connect); None: vLLM's rule (bind on `*`, `::`, ipc, inproc).
    bind: bool | None = None
    # Ours too: the block hashes sent. "own": the replica's u64 chain (replica/kv.py); "vllm":
    # 32-byte sha256 keyed by a random root per process, as vLLM's default hashes are: no
    # router can reproduce them (routers key blocks by their token ids).
    hashes: Literal["own", "vllm"] = "own"

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher != "null"

    @model_validator(mode="after")
    def _known_transports(self) -> KvEventsConfig:
        for name, value in (("endpoint", self.endpoint), ("replay_endpoint", self.replay_endpoint)):
            if value is not None and not value.startswith(_TRANSPORTS):
                raise ValueError(
                    f"{name} '{value}' must start with one of {', '.join(_TRANSPORTS)}"
                )
        return self


_TRANSPORTS = ("tcp://", "ipc://", "inproc://")


class TinyGptParams(_Frozen):
    layers: int = Field(default=2, gt=0)
    width: int = Field(default=128, gt=0)
    heads: int = Field(default=4, gt=0)
    context_len: int = Field(default=512, gt=1)
    seed: int = 0
    weights_path: Path | None = None
    ascii_only: bool = True  # random weights: keep output printable; turn off for trained weights
    # float64 makes greedy tokens independent of batch-mates beyond doubt; float32 (faster) can
    # flip a near-tie argmax when a different batch shape rounds differently (~1e-6).
    dtype: Literal["float32", "float64"] = "float32"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyGptParams:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        return self


class ClassifierParams(_Frozen):
    input_size: int = Field(default=1024, gt=0)
    hidden_sizes: tuple[int, ...] = (2048, 2048)
    num_classes: int = Field(default=10, gt=0)
    seed: int = 0
    weights_path: Path | None = None
    max_rows_per_request: int = Field(default=64, gt=0)


class TinyGptModelConfig(_Frozen):
    name: str = Field(default="tiny-gpt", min_length=1)
    kind: Literal["tiny-gpt"]
    params: TinyGptParams = TinyGptParams()
    max_tokens_limit: int = Field(default=256, gt=0)
    batcher: BatcherConfig = ContinuousBatcherConfig(kind="continuous")


class ClassifierModelConfig(_Frozen):
    name: str = Field(default="classifier", min_length=1)
    kind: Literal["classifier"]
    params: ClassifierParams = ClassifierParams()
    batcher: BatcherConfig = DynamicBatcherConfig(kind="dynamic")

    @model_validator(mode="after")
    def _no_continuous(self) -> ClassifierModelConfig:
        if self.batcher.kind == "continuous":
            raise ValueError("batcher.kind 'continuous' is for generative models only")
        return self


ModelConfig = Annotated[TinyGptModelConfig | ClassifierModelConfig, Field(discriminator="kind")]


def _default_models() -> tuple[ModelConfig, ...]:
    return (TinyGptModelConfig(kind="tiny-gpt"), ClassifierModelConfig(kind="classifier"))


def keeps_prefix_cache(model: ModelConfig) -> bool:
    batcher = model.batcher
    return isinstance(batcher, ContinuousBatcherConfig) and batcher.prefix_cache.enabled


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


class TracingConfig(_Frozen):
    """OpenTelemetry traces (replica/tracing.py; needs the `otel` extra), as the gateway's
    `tracing:` (gateway/config/schema.py): a span for each inference request, its parent the
    caller's `traceparent`, and its sequences' queue, batch, prefill and decode."""

    otlp_endpoint: Annotated[str, AfterValidator(otlp_endpoint)]
    sample_ratio: float = Field(default=1.0, ge=0, le=1)  # when the caller decided none
    service_name: str = Field(default="infergate-replica", min_length=1, max_length=256)

    @model_validator(mode="after")
    def _extra_installed(self) -> TracingConfig:
        if otel_missing():
            raise ValueError(f"needs the OpenTelemetry packages: {OTEL_EXTRA}")
        return self


class ReplicaConfig(_Frozen):
    server: ServerConfig = ServerConfig()
    engine: EngineConfig = EngineConfig()
    models: tuple[ModelConfig, ...] = Field(default_factory=_default_models, min_length=1)
    kv_events: KvEventsConfig = KvEventsConfig()
    tracing: TracingConfig | None = None  # None: no traces, no OpenTelemetry module loaded

    @model_validator(mode="after")
    def _one_cache_to_publish(self) -> ReplicaConfig:
        """As a vLLM process, the replica publishes the events of one model's prefix cache (a
        replica with none publishes nothing: a launcher may turn events on for every replica)."""
        if not self.kv_events.enabled:
            return self
        caching = [m.name for m in self.models if keeps_prefix_cache(m)]
        if len(caching) > 1:
            raise ValueError(
                "kv_events: publishes one model's prefix cache (a tiny-gpt model with "
                f"batcher.kind continuous and prefix_cache.enabled); found {len(caching)}: "
                + ", ".join(caching)
            )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> ReplicaConfig:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model name '{model.name}' is used twice")
            seen.add(model.name)
        return self


def parse_config(raw: Any) -> ReplicaConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"(root): expected a mapping, got {type(raw).__name__}")
    try:
        return ReplicaConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, raw)) from None


def read_raw(path: Path, what: str = "") -> Any:
    """A YAML file as plain data, read within bounds (gateway/yamlfile.py: an alias bomb or a
    deeply nested file is refused at once); `what` (a key path) prefixes every error."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{what}cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}cannot read {path}: not UTF-8 text") from None
    try:
        return load_yaml(text)
    except gateway_errors.ConfigError as error:
        raise ConfigError(f"{what}{path}: invalid YAML: {error}") from None


def load_config(path: Path | str) -> ReplicaConfig:
    return parse_config(read_raw(Path(path)))
