"""Batchers: one interface (`submit`, `close`, `load`), chosen by name in the model's config.

Request-level: `none`, `static`, `dynamic` (any model). Iteration-level: `continuous`
(generation only). See each module's docstring for its dispatch rule.
"""

from replica.batching.base import Batcher, Load, QueueKnobs, RequestBatcher
from replica.batching.continuous import ContinuousBatcher
from replica.batching.dynamic import DynamicBatcher
from replica.batching.none import NoBatcher
from replica.batching.static import StaticBatcher

__all__ = [
    "Batcher",
    "ContinuousBatcher",
    "DynamicBatcher",
    "Load",
    "NoBatcher",
    "QueueKnobs",
    "RequestBatcher",
    "StaticBatcher",
]
