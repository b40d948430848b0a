"""Tenants' service shared by a gateway's workers: each worker's charges are seen by every
worker, decayed together; tenants past the table stay local; a correction never takes the sum
below zero."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.flow.service_shared import SharedService


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[SharedService, SharedService, Clock]]:
    clock = Clock()
    name, lock = f"ig-svc-{uuid.uuid4().hex[:12]}", tmp_path / "service.lock"
    first = SharedService(name, 2, 0, slots=4, lock_path=lock, clock=clock, half_life_s=10.0,
                          create=True)  # fmt: skip
    second = SharedService(name, 2, 1, slots=4, lock_path=lock, clock=clock, half_life_s=10.0)
    try:
        yield first, second, clock
    finally:
        second.close()
        first.close()
        first.unlink()


def test_every_worker_sees_the_sum_of_every_workers_charges(
    workers: tuple[SharedService, SharedService, Clock],
) -> None:
    first, second, clock = workers
    first.charge("a", 300)
    second.charge("a", 100)
    second.charge("b", 50)
    assert first.value("a") == second.value("a") == pytest.approx(400)
    assert first.value("b") == pytest.approx(50) and first.value("c") == 0.0
    clock.now = 10.0
    assert second.value("a") == pytest.approx(200)  # one half-life


def test_a_correction_never_makes_a_tenant_owe(
    workers: tuple[SharedService, SharedService, Clock],
) -> None:
    first, second, _ = workers
    first.charge("a", 100)
    second.charge("a", -500)  # its request used far less than its estimate
    assert first.value("a") == pytest.approx(0.0, abs=1e-9)


def test_tenants_past_the_table_are_kept_by_each_worker(
    workers: tuple[SharedService, SharedService, Clock],
) -> None:
    first, second, _ = workers
    for i in range(4):
        first.charge(f"t{i}", 1)
    first.charge("late", 7)  # the table (4 slots) is full: this worker's own counter
    assert first.value("late") == pytest.approx(7)
    assert second.value("late") == 0.0
    assert second.value("t3") == pytest.approx(1)
