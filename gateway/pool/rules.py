"""The rules admission applies: what it reads of the config in force (the policy, the limits,
outlier detection, flow control); a reload hands it new ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config import FlowControl, Limits, OutlierDetection
from gateway.routing.base import Policy


@dataclass(frozen=True)
class Rules:
    """What admission reads of the config in force; a reload hands it new ones."""

    policy: Policy
    limits: Limits
    outlier_detection: OutlierDetection | None = None
    ewma_decay_s: float = 10.0
    model_policies: Mapping[str, Policy] = field(default_factory=dict)  # models[].strategy
    flow: FlowControl | None = None  # classes, fairness and the queue's bounds; None: one FIFO
    max_age_s: float = 2.0  # load_feedback.max_age_s: how long a reported capacity holds
    weights: Mapping[str, float] = field(default_factory=dict)  # tenant -> its keys' weight

    @property
    def max_queued(self) -> int:
        return self.flow.max_queued if self.flow is not None else self.limits.max_queue

    @property
    def queue_ttl_s(self) -> float:
        return self.flow.queue_ttl_s if self.flow is not None else self.limits.queue_timeout_s

    def policy_for(self, model: str | None) -> Policy:
        return self.model_policies.get(model, self.policy) if model is not None else self.policy

    def policies(self) -> list[Policy]:
        return [self.policy, *self.model_policies.values()]
