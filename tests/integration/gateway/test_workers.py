"""`workers: 2`: two gateway processes on one port, as a user runs them (`infergate gateway`),
in front of fake replicas: exact least-outstanding across both, one /metrics with the totals of
both, a reload seen by both, SIGTERM draining both, and a killed worker replaced."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import BIN, free_port, stop, wait_http_ok
from tests.support.raw_http import connect, read_response
from tests.support.servers import (
    FakeReplica,
    fake_replicas,
    gateway_config,
    get_json,
    write_config,
)


@asynccontextmanager
async def two_workers(
    tmp_path: Path, replicas: list[FakeReplica], **extra: Any
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes], Path]]:
    port = free_port()
    path = tmp_path / "g.yaml"
    config = gateway_config(
        replicas, "least_outstanding_requests", workers=2, listen={"port": port}, **extra
    )
    write_config(path, config)
    proc = subprocess.Popen([str(BIN / "infergate"), "gateway", "-c", str(path)])
    try:
        await wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc)
        await until_both(f"http://127.0.0.1:{port}", lambda s: True)
        yield f"http://127.0.0.1:{port}", proc, path
    finally:
        for replica in replicas:
            replica.release.set()
        stop(proc, timeout_s=20)


def worker_processes(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The supervisor's live workers (not its resource tracker, nor a dead one not yet reaped)."""
    out = []
    for child in psutil.Process(proc.pid).children():
        try:
            if "--worker" in child.cmdline():
                out.append(child)
        except psutil.Error:  # a zombie: dead, not yet waited for
            continue
    return out


async def statuses(url: str, n: int = 12) -> list[dict[str, Any]]:
    """The status page as n fresh connections see it (each may land on either worker)."""
    out = []
    for _ in range(n):
        async with aiohttp.ClientSession() as client, client.get(f"{url}/ui/status.json") as r:
            out.append(await r.json())
    return out


async def until_both(url: str, ok: Any, timeout_s: float = 10) -> None:
    """Until both workers have answered with a status for which ok() holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    seen: set[int] = set()
    while seen != {0, 1}:
        assert loop.time() < deadline, f"only workers {seen} answered as expected"
        seen |= {s["worker"] for s in await statuses(url) if ok(s)}


async def on_fresh_connection(url: str) -> tuple[aiohttp.ClientSession, int]:
    """A client holding one new connection to the gateway, and the worker that accepted it
    (which answers every request on it)."""
    client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    async with client.get(f"{url}/ui/status.json") as response:
        return client, (await response.json())["worker"]


async def test_least_outstanding_is_exact_across_two_workers(tmp_path: Path) -> None:
    async with (
        fake_replicas(3) as replicas,
        two_workers(tmp_path, replicas) as (url, _, _),
    ):
        # One at a time, each on a new connection: where each request goes depends on what
        # both workers hold, so the spread stays within one throughout (alone, each worker
        # would balance only its own and drift apart).
        held, clients, accepted = [], [], []
        loop = asyncio.get_running_loop()
        for n in range(1, 61):
            client, worker = await on_fresh_connection(url)
            clients.append(client)
            accepted.append(worker)
            held.append(asyncio.create_task(client.post(f"{url}/hold")))
            deadline = loop.time() + 10
            while sum(r.in_flight for r in replicas) < n:
                assert loop.time() < deadline, [r.in_flight for r in replicas]
                await asyncio.sleep(0.005)
            spread = [r.in_flight for r in replicas]
            assert max(spread) - min(spread) <= 1, (n, spread)
        # The kernel spreads new connections over the workers (one listening socket each,
        # SO_REUSEPORT), even one at a time: each takes at least 10 of 60 (by chance, fewer
        # with probability 2e-8). One shared socket gave all 60 to one worker.
        assert min(accepted.count(0), accepted.count(1)) >= 10, accepted
        assert all(sum(r["outstanding"] for r in s["replicas"]) == 60 for s in await statuses(url))
        for replica in replicas:
            replica.release.set()
        for response in await asyncio.gather(*held):
            assert response.status == 200
            response.release()
        for client in clients:
            await client.close()
        await until_both(url, lambda s: all(r["outstanding"] == 0 for r in s["replicas"]))
        for _ in range(4):  # every worker's /metrics has the totals of both
            async with aiohttp.ClientSession() as fresh, fresh.get(f"{url}/metrics") as r:
                text = await r.text()
            total = sum(
                s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "gateway_requests_total"
            )
            assert total == 60


async def test_the_kernel_spreads_connections_not_the_worker_awake_first(tmp_path: Path) -> None:
    # Worker 1 stopped (SIGSTOP) while 60 clients connect and send a request: each connection
    # is the kernel's to place, at its handshake, so worker 1 still answers its share once it
    # runs again; with one shared socket worker 0, being awake, took every one of them.
    async with fake_replicas(1) as replicas, two_workers(tmp_path, replicas) as (url, proc, _):
        (stopped,) = [p for p in worker_processes(proc) if "1/2" in p.cmdline()]
        stopped.suspend()
        try:
            connections = [await connect(url) for _ in range(60)]
            for _, writer in connections:
                writer.write(b"GET /ui/status.json HTTP/1.1\r\nHost: gw\r\n\r\n")
            answers = [asyncio.create_task(read_response(reader)) for reader, _ in connections]
            # Worker 0 answers all it was given; the test holds for any wait (the placement
            # was made at connect time): the wait is what lets a shared socket show itself.
            await asyncio.wait(answers, timeout=2)
        finally:
            stopped.resume()
        accepted = [(await answer).json()["worker"] for answer in answers]
        for _, writer in connections:
            writer.close()
    # At least 10 of 60 each: by chance fewer with probability 3e-8.
    assert min(accepted.count(0), accepted.count(1)) >= 10, accepted


async def test_slot_limits_hold_across_two_workers(tmp_path: Path) -> None:
    # One slot per replica, two replicas, 120 requests at once on fresh connections (so on
    # both workers): each worker queues its own, and when a slot frees both may look for it
    # in the same instant; only one may take it, so no replica ever holds two.
    limits = {"max_outstanding_per_replica": 1, "max_queue": 200, "queue_timeout_s": 30}
    async with (
        fake_replicas(2) as replicas,
        two_workers(tmp_path, replicas, limits=limits) as (url, _, _),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as c,
    ):

        async def one() -> int:
            async with c.post(f"{url}/sleep?s=0.01") as response:
                await response.read()
                return response.status

        codes = await asyncio.gather(*(one() for _ in range(120)))
        assert codes == [200] * 120
        assert [r.peak for r in replicas] == [1, 1]
        # Both workers answer (fresh connections until each has: which one accepts is the
        # kernel's choice) with nothing outstanding and nothing queued.
        await until_both(
            url, lambda s: s["queued"] == 0 and all(r["outstanding"] == 0 for r in s["replicas"])
        )


async def test_a_reload_reaches_both_workers(tmp_path: Path) -> None:
    async with fake_replicas(2) as replicas, two_workers(tmp_path, replicas) as (url, _, path):
        config = gateway_config(
            replicas, "round_robin", workers=2, listen={"port": int(url.rsplit(":", 1)[1])}
        )
        write_config(path, config)
        await until_both(url, lambda s: s["strategy"] == "round_robin")


async def test_sigterm_drains_both_workers_and_a_killed_worker_is_replaced(
    tmp_path: Path,
) -> None:
    async with (
        fake_replicas(2) as replicas,
        two_workers(tmp_path, replicas) as (url, proc, _),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as c,
    ):
        workers = worker_processes(proc)
        assert len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (now := {p.pid for p in worker_processes(proc)}) & {workers[0].pid} or len(now) < 2:
            assert loop.time() < deadline, "the killed worker was not replaced"
            await asyncio.sleep(0.05)
        await until_both(url, lambda s: True)

        held = [asyncio.create_task(c.post(f"{url}/hold")) for _ in range(20)]
        while sum(r.in_flight for r in replicas) < 20:
            assert loop.time() < deadline + 10
            await asyncio.sleep(0.02)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # both workers now drain: no new connections
        for replica in replicas:
            replica.release.set()
        for response in await asyncio.gather(*held):
            assert response.status == 200  # every request in flight finished
            response.release()
        assert await asyncio.to_thread(proc.wait, 30) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    assert not [
        name for name in os.listdir("/dev/shm") if name.startswith(f"infergate-{proc.pid}-")
    ]


async def test_workers_do_not_outlive_a_supervisor_killed_with_sigkill(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas, two_workers(tmp_path, replicas) as (_, proc, _):
        workers = worker_processes(proc)
        assert len(workers) == 2
        proc.kill()
        _, alive = await asyncio.to_thread(psutil.wait_procs, workers, 10)
        assert not alive, "workers left holding the port"
    # What it left in the temp directory goes when the next supervisor starts.


async def test_jobs_with_two_workers_one_scheduler_any_worker_answers(tmp_path: Path) -> None:
    """Worker 0 owns the job store and its scheduler; a batch submitted through either worker
    runs once per line, and either worker answers for it, cancels included."""
    jobs = {"store": str(tmp_path / "jobs.db"), "poll_interval_s": 0.01}
    async with (
        fake_replicas(2) as replicas,
        two_workers(tmp_path, replicas, jobs=jobs) as (url, _, _),
    ):
        lines = [
            {"custom_id": str(i), "url": "/v1/completions", "body": {"prompt": f"{i}"}}
            for i in range(40)
        ]
        data = "\n".join(json.dumps(line) for line in lines).encode()
        batch_urls = []
        for _ in range(4):  # fresh connections: either worker takes the submit
            async with aiohttp.ClientSession() as c, c.post(f"{url}/v1/batches", data=data) as r:
                assert r.status == 202, await r.text()
                batch_urls.append(url + r.headers["Location"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        for batch_url in batch_urls:
            while True:
                async with aiohttp.ClientSession() as c, c.get(batch_url) as r:
                    batch = await r.json()
                if batch["status"] == "completed":
                    break
                assert loop.time() < deadline, batch
                await asyncio.sleep(0.05)
            counts = batch["request_counts"]
            assert (counts["total"], counts["completed"], counts["failed"]) == (40, 40, 0)
            async with aiohttp.ClientSession() as c, c.get(f"{batch_url}/results") as r:
                assert len((await r.text()).splitlines()) == 40
        sent = [s for r in replicas for s in r.seen if s["path"] == "/v1/completions"]
        assert len(sent) == 160  # every line ran exactly once
        single = {"url": "/hold", "body": {}}
        async with aiohttp.ClientSession() as c, c.post(f"{url}/v1/jobs", json=single) as r:
            job_url = url + r.headers["Location"]
        for _ in range(6):  # a cancel through whichever worker: the job is cancelled
            async with aiohttp.ClientSession() as c, c.delete(job_url) as r:
                if r.status == 200:
                    break
        async with aiohttp.ClientSession() as c, c.get(job_url) as r:
            assert (await r.json())["status"] == "cancelled"


async def test_the_files_and_batches_api_through_either_worker(tmp_path: Path) -> None:
    """An upload, a batch made from it and its output file, each through a fresh connection
    (either worker): the worker that is not the jobs leader passes the multipart form whole."""
    jobs = {"store": str(tmp_path / "jobs.db"), "poll_interval_s": 0.01}
    lines = [
        {"custom_id": str(i), "method": "POST", "url": "/v1/completions", "body": {"n": i}}
        for i in range(10)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    async with (
        fake_replicas(1) as replicas,
        two_workers(tmp_path, replicas, jobs=jobs) as (url, _, _),
    ):
        files = []
        for _ in range(4):
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", data, filename="b.jsonl")
            async with aiohttp.ClientSession() as c, c.post(f"{url}/v1/files", data=form) as r:
                assert r.status == 200, await r.text()
                files.append((await r.json())["id"])
        create = {"input_file_id": files[-1], "endpoint": "/v1/completions",
                  "completion_window": "24h"}  # fmt: skip
        async with aiohttp.ClientSession() as c, c.post(f"{url}/v1/batches", json=create) as r:
            assert r.status == 200, await r.text()
            batch_url = url + r.headers["Location"]
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            async with aiohttp.ClientSession() as c, c.get(batch_url) as r:
                batch = await r.json()
            if batch["status"] == "completed":
                break
            assert asyncio.get_running_loop().time() < deadline, batch
            await asyncio.sleep(0.05)
        output = []
        for _ in range(4):
            content = f"{url}/v1/files/{batch['output_file_id']}/content"
            async with aiohttp.ClientSession() as c, c.get(content) as r:
                output.append(
                    [json.loads(line)["custom_id"] for line in (await r.text()).splitlines()]
                )
        async with aiohttp.ClientSession() as c, c.get(f"{url}/v1/files?purpose=batch") as r:
            listed = [f["id"] for f in (await r.json())["data"]]
    assert output == [[str(i) for i in range(10)]] * 4
    assert listed == files[::-1]
    assert len([s for s in replicas[0].seen if s["path"] == "/v1/completions"]) == 10


async def test_a_reload_signal_while_workers_start_is_a_reload_not_a_crash(
    tmp_path: Path,
) -> None:
    async with fake_replicas(1) as replicas:
        port = free_port()
        path = tmp_path / "g.yaml"
        write_config(path, gateway_config(replicas, "random", workers=2, listen={"port": port}))
        proc = subprocess.Popen([str(BIN / "infergate"), "gateway", "-c", str(path)])
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while len(worker_processes(proc)) < 2:
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            started = {p.pid for p in worker_processes(proc)}
            proc.send_signal(signal.SIGHUP)  # they are still importing
            await wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc)
            await asyncio.sleep(0.5)
            assert {p.pid for p in worker_processes(proc)} == started
        finally:
            stop(proc, timeout_s=20)


async def test_a_worker_that_cannot_start_stops_the_gateway(tmp_path: Path) -> None:
    """As one gateway would exit 2 on a job store it cannot open, so does the supervisor."""
    async with fake_replicas(1) as replicas:
        path = tmp_path / "g.yaml"
        jobs = {"store": "/proc/no-such-dir/jobs.db"}
        config = gateway_config(
            replicas, "random", workers=2, listen={"port": free_port()}, jobs=jobs
        )
        write_config(path, config)
        proc = subprocess.Popen([str(BIN / "infergate"), "gateway", "-c", str(path)])
        try:
            assert await asyncio.to_thread(proc.wait, 30) == 2
        finally:
            stop(proc)


async def clients_of_both(url: str, n: int) -> list[tuple[aiohttp.ClientSession, int]]:
    """n clients on fresh connections, each with the worker that accepted it, among which both
    workers (more are made until both are seen; each is 1/2 by chance)."""
    out = [await on_fresh_connection(url) for _ in range(n)]
    for _ in range(60):
        if {w for _, w in out} == {0, 1}:
            return out
        out.append(await on_fresh_connection(url))
    raise AssertionError(f"one worker took 60 fresh connections: {[w for _, w in out]}")


async def test_every_number_an_operator_reads_is_the_whole_gateways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERGATE_ADMIN_TOKEN", "tok")
    admin = {"Authorization": "Bearer tok"}
    limits = {"max_outstanding_per_replica": 1, "max_queue": 100, "queue_timeout_s": 30}
    async with (
        fake_replicas(2) as replicas,
        two_workers(tmp_path, replicas, limits=limits) as (url, _, _),
    ):
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True)
        ) as c:
            for _ in range(200):  # each on a new connection: the workers share them
                async with c.get(f"{url}/x") as r:
                    assert r.status == 200
        clients = await clients_of_both(url, 12)
        try:
            # Two replicas of one slot each: two requests held there, the rest queued in the
            # worker that took them; each worker reports the whole gateway's queue.
            held = [asyncio.create_task(client.post(f"{url}/hold")) for client, _ in clients]
            queued = len(clients) - 2
            await until_both(url, lambda s: s["queued"] == queued)
            readers = await clients_of_both(url, 2)  # the others wait on their requests
            clients += readers
            for worker, client in {w: c for c, w in readers}.items():  # one of each
                async with client.get(f"{url}/metrics") as r:
                    text = await r.text()
                depth = [s.value for f in text_string_to_metric_families(text)
                         for s in f.samples if s.name == "gateway_queue_depth"]  # fmt: skip
                assert depth == [queued], (worker, depth)
            for replica in replicas:
                replica.release.set()
            for response in await asyncio.gather(*held):  # no request was lost
                assert response.status == 200
                response.release()
            # Every worker's /admin/replicas and status page count every worker's requests.
            answered = set()
            for client, worker in clients:
                async with client.get(f"{url}/admin/replicas", headers=admin) as r:
                    body = await r.json()
                totals = sum(r["requests_total"] for r in body["replicas"])
                page = await get_json(client, f"{url}/ui/status.json")
                shown = sum(r["requests_total"] for r in page["replicas"])
                assert (worker, totals, shown) == (worker, 200 + len(held), 200 + len(held))
                answered.add(worker)
            assert answered == {0, 1}
        finally:
            for client, _ in clients:
                await client.close()
        await until_both(
            url, lambda s: s["queued"] == 0 and all(r["outstanding"] == 0 for r in s["replicas"])
        )
