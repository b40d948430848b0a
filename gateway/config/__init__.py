"""Gateway configuration: one YAML file, validated fully into frozen models before any use.

`load_config(path)` is the only way config enters the program (load.py). The models are in
schema.py, the rules for single values (URLs, paths, the environment, passwords) in values.py.
Every error names the key path and what was expected (`replicas[2].url: ...`), so a bad file is
fixed from one line.
"""

from gateway.config.load import load_config, parse_config
from gateway.config.schema import (
    ApiKey,
    Auth,
    Discovery,
    FlowClass,
    FlowControl,
    GatewayConfig,
    HealthCheck,
    Jobs,
    KeyLimits,
    Limits,
    Listen,
    LoadFeedback,
    LoadMetrics,
    ModelRoute,
    OutlierDetection,
    Reload,
    ReplicaSpec,
    Retries,
    Routing,
    ServedModels,
    Timeouts,
    Ui,
)
from gateway.config.values import is_postgres_url, redacted
from gateway.errors import ConfigError

__all__ = [
    "ApiKey", "Auth", "ConfigError", "Discovery", "FlowClass", "FlowControl", "GatewayConfig",
    "HealthCheck", "Jobs", "KeyLimits", "Limits", "Listen", "LoadFeedback", "LoadMetrics",
    "ModelRoute", "OutlierDetection", "Reload", "ReplicaSpec", "Retries", "Routing",
    "ServedModels", "Timeouts", "Ui",
    "is_postgres_url", "load_config", "parse_config", "redacted",
]  # fmt: skip
