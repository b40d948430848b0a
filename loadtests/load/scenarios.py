"""The routing benchmark's shape, shared by the live runner (loadtests/bench.py) and the
discrete-event model (loadtests/sim/model.py) so neither imports the other: the SageMaker
scenarios (users / instances), what one simulated instance runs at once, and the load that
saturates it."""

from __future__ import annotations

SAGEMAKER_SCENARIOS = ((4, 1), (20, 5), (40, 10), (60, 15), (80, 20))
QUICK_SCENARIOS = ((20, 5),)  # where routing matters; 4/1 (one instance) is the control
# Sequences one instance runs at once: an ml.g5.24xlarge of the study has 4 GPUs, one model
# copy each.
INSTANCE_CONCURRENCY = 4
# A capacity (saturation) run keeps this many requests per slot outstanding, so every slot is
# refilled from a queue the moment it frees and the replicas never idle.
SATURATION_USERS_PER_SLOT = 2


def saturation_users(instances: int) -> int:
    return SATURATION_USERS_PER_SLOT * INSTANCE_CONCURRENCY * instances


def parse_scenarios(text: str) -> tuple[tuple[int, int], ...]:
    """`4/1,20/5` -> ((4, 1), (20, 5))."""
    pairs = []
    for item in text.split(","):
        users, _, instances = item.partition("/")
        pairs.append((int(users), int(instances)))
    return tuple(pairs)


def format_scenarios(scenarios: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{users}/{instances}" for users, instances in scenarios)
