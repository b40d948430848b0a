"""What a batcher reports as it works; `metrics.ModelMetrics` implements it, tests use the no-op."""

from __future__ import annotations

from typing import Protocol


class BatchObserver(Protocol):
    def on_dispatch(self, queue_wait_s: float) -> None: ...

    def on_batch(self, size: int, compute_s: float) -> None: ...

    def on_reject(self, reason: str) -> None: ...


class NullObserver:
    def on_dispatch(self, queue_wait_s: float) -> None:
        return None

    def on_batch(self, size: int, compute_s: float) -> None:
        return None

    def on_reject(self, reason: str) -> None:
        return None
