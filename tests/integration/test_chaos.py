"""Fault drills against real replica and gateway processes on loopback (loadtests/chaos.py),
shortened for CI. Each asserts on what clients saw; timings are only bounded, never compared."""

from __future__ import annotations

from pathlib import Path

from loadtests import chaos
from loadtests.harness.fleet import fleet


async def test_crash_and_restart_loses_no_request(tmp_path: Path) -> None:
    async with fleet(tmp_path, 3) as f:
        report = await chaos.crash(f, before_s=1.5, down_s=3, after_s=3, clients=12)
    assert report.sent > 50
    assert report.failed == 0, report.line()
    assert report.retried >= 1
    assert report.eject_s is not None and report.eject_s < 1.0, report.line()
    assert report.restore_s is not None, "the restarted replica never came back"


async def test_hung_replica_requests_are_retried_after_the_timeout(tmp_path: Path) -> None:
    async with fleet(tmp_path, 3) as f:
        report = await chaos.hang(f, before_s=1.5, stopped_s=4, after_s=3, clients=12)
    assert report.failed == 0, report.line()
    assert report.retried >= 1, report.line()
    assert report.eject_s is not None and report.restore_s is not None, report.line()


async def test_streams_cut_by_a_crash_end_with_an_error_event(tmp_path: Path) -> None:
    async with fleet(tmp_path, 2) as f:
        report = await chaos.stream_cut(f, streams=6)
    assert report.failed == 0, report.line()  # no silent close
    assert "0 cut" not in report.notes[0], report.line()  # the crash did cut some streams


async def test_overload_gets_fast_429s_and_recovers(tmp_path: Path) -> None:
    limits = {"max_outstanding_per_replica": 4, "max_queue": 8, "queue_timeout_s": 2.0}
    async with fleet(tmp_path, 2, limits=limits) as f:
        report = await chaos.overload(f, burst=160, steady_s=2)
    assert report.rejected_429 >= 100, report.line()
    assert report.failed == 0, report.line()  # admitted ones succeed, and so does recovery


async def test_reload_that_removes_a_replica_under_load_loses_nothing(tmp_path: Path) -> None:
    async with fleet(tmp_path, 3) as f:
        report = await chaos.reload_remove(f, clients=12, after_s=3)
    assert report.sent > 10
    assert report.failed == 0, report.line()
