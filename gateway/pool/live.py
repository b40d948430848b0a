"""The gateway in force, as the data path, the control loops and the jobs read it: the Runtime
that a config reload swaps as one reference (config + policies), and the pool and admission,
which outlive every reload.

A request reads `live.runtime` once at dispatch, so a reload never changes the rules halfway
through a request; the pool is shared across runtimes, so outstanding counts survive a swap.
Handlers find it under the app key LIVE; the loops and the jobs are handed it. What watches
the gateway (metrics, the status page) subscribes to `swapped` and to the pool's and
admission's signals; nothing here calls them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.flow.limits import Limiter, LocalTable, Table
from gateway.flow.service import Service
from gateway.pool.admission import Admission
from gateway.pool.replicas import ReplicaPool
from gateway.pool.rules import Rules
from gateway.routing.base import Policy
from gateway.routing.options import PolicyOptions
from gateway.routing.policies import make_policy


@dataclass(frozen=True)
class Runtime:
    config: GatewayConfig
    policy: Policy
    options: PolicyOptions
    model_policies: Mapping[str, Policy] = field(default_factory=dict)  # `models[].strategy`

    def policy_for(self, model: str | None) -> Policy:
        return self.model_policies.get(model, self.policy) if model is not None else self.policy


def build_runtime(config: GatewayConfig, previous: Runtime | None = None) -> Runtime:
    """A new runtime; an unchanged strategy keeps its policy object (round robin keeps its turn,
    prefix_aware its index), and so does a model whose strategy and options are unchanged."""
    routing, options = config.routing, config.policy_options()
    same = previous is not None and (previous.config.routing, previous.options) == (
        routing,
        options,
    )
    rng = random.Random(routing.seed)
    policy = previous.policy if same and previous else make_policy(routing.strategy, rng, options)
    model_policies: dict[str, Policy] = {}
    for route in config.models:
        if route.strategy is None:
            continue
        unchanged = previous is not None and previous.options == options
        kept = previous.model_policies.get(route.name) if unchanged and previous else None
        if kept is not None and previous and _strategy_of(previous, route.name) == route.strategy:
            model_policies[route.name] = kept
        else:
            model_policies[route.name] = make_policy(route.strategy, rng, options)
    return Runtime(config, policy, options, model_policies)


def _strategy_of(runtime: Runtime, model: str) -> str | None:
    return next((m.strategy for m in runtime.config.models if m.name == model), None)


@dataclass(eq=False)
class Live:
    runtime: Runtime
    pool: ReplicaPool
    admission: Admission
    worker: tuple[int, int] | None = None  # (index, count) under `workers: N`; None: alone
    draining: bool = False  # set on shutdown: /readyz answers 503 so load balancers move on
    discovered: tuple[str, ...] | None = None  # DNS discovery's last good answer
    models_polled: bool = False  # the first round of GET /v1/models is done (or polling is off)
    # A signal: each is called with the runtime a reload (or the start) put in force.
    swapped: list[Callable[[Runtime], None]] = field(default_factory=list)
    # Keys' limits: in this process, or shared by the workers (gateway/flow/buckets_shared.py).
    limiter: Limiter = field(default_factory=lambda: Limiter(LocalTable()))

    @classmethod
    def start(
        cls,
        runtime: Runtime,
        pool: ReplicaPool,
        limits: Table | None = None,
        service: Service | None = None,
    ) -> Live:
        """`limits`, `service`: where the keys' limits and the tenants' service are kept
        (default: this process; with `workers: N`, shared by the workers)."""
        admission = Admission(pool, service=service)
        return cls(runtime, pool, admission, limiter=Limiter(limits or LocalTable()))

    def swap(self, runtime: Runtime) -> None:
        config = runtime.config
        self.runtime = runtime
        self.admission.configure(
            Rules(
                runtime.policy,
                config.limits,
                config.outlier_detection,
                config.routing.ewma_decay_s,
                runtime.model_policies,
                config.flow_control,
                config.load_feedback.max_age_s,
                {key.tenant_name: key.weight for key in config.auth.api_keys}
                if config.auth is not None
                else {},
            )
        )
        self.admission.explain = config.routing.explain
        self.pool.update(
            self.replica_urls(config), config.replica_max_concurrency, config.replica_models
        )
        for subscriber in self.swapped:
            subscriber(runtime)

    def replica_urls(self, config: GatewayConfig) -> list[str]:
        """Discovery owns the list when configured; until its first answer the pool stays."""
        if config.discovery is None:
            self.discovered = None
            return config.replica_urls
        if self.discovered is None:
            return [replica.url for replica in self.pool.active()]
        return list(self.discovered)


LIVE = web.AppKey("live", Live)
