"""The gateway as a process: start-up errors, signals, and no torch."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.processes import BIN, free_port, stop, wait_http_ok
from tests.support.servers import fake_replicas

GOOD = {"replicas": [{"url": "http://127.0.0.1:9001"}]}
BAD_FILES = {
    "unknown key": ({**GOOD, "listen": {"hots": "x"}}, "listen.hots: unknown key"),
    "wrong type": ({**GOOD, "listen": {"port": "eighty"}}, "listen.port: "),
    "bad url": ({"replicas": [{"url": "ftp://a"}]}, "replicas[0].url: "),
    "empty replicas": ({"replicas": []}, "replicas: at least one replica is required"),
    "unknown strategy": ({**GOOD, "routing": {"strategy": "fast"}}, "routing.strategy: "),
    "no replicas key": ({"routing": {"strategy": "random"}}, "replicas: required key"),
    "not a mapping": (["a"], "(top level): expected a mapping"),
}


def _run_gateway(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "infergate"), "gateway", "-c", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_exits_nonzero_with_one_line_naming_the_key(case: str, tmp_path: Path) -> None:
    content, expected = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    result = _run_gateway(path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("replicas:\n  - url: [unclosed\n")
    result = _run_gateway(path)
    assert result.returncode == 2 and "line " in result.stderr
    result = _run_gateway(tmp_path / "missing.yaml")
    assert result.returncode == 2 and "cannot read" in result.stderr


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ("gateway", "usage: infergate gateway"),
        ("up", "usage: infergate up"),
        ("jobs", "usage: infergate jobs"),
        ("replica", "usage: replica"),  # the replica's own entry point, `python -m replica`
        ("bench", "usage: infergate bench"),  # `python -m loadtests.bench`
    ],
)
def test_every_documented_command_answers_help(command: str, usage: str) -> None:
    result = subprocess.run(
        [str(BIN / "infergate"), command, "-h"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage), result.stdout


def test_a_command_whose_package_is_not_installed_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.app import cli

    monkeypatch.setitem(cli.ENTRY_POINTS, "bench", "no_such_package_here.bench")
    assert cli.main(["bench", "--quick"]) == 2
    assert "the 'no_such_package_here' package is not installed" in capsys.readouterr().err


def test_gateway_never_imports_torch() -> None:
    code = (
        "import sys, gateway.app.cli, gateway.app.server, gateway.datapath.proxy;"
        "import gateway.routing.policies;"
        "assert 'torch' not in sys.modules, 'gateway imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_sighup_reloads_and_sigterm_exits_zero(tmp_path: Path) -> None:
    async with fake_replicas(2) as replicas:
        port = free_port()
        path = tmp_path / "g.yaml"
        config = {
            "listen": {"host": "127.0.0.1", "port": port},
            "routing": {"strategy": "RANDOM"},
            "replicas": [{"url": r.url} for r in replicas],
            "reload": {"watch": False},
        }
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "INFERGATE_ADMIN_TOKEN": "t"}
        log = tmp_path / "gateway.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "-c", str(path)],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_http_ok(f"{base}/healthz", proc)
            path.write_text(yaml.safe_dump({**config, "routing": {"strategy": "round_robin"}}))
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as client:
                assert await _strategy(client, base) == "random"
                await asyncio.sleep(0.3)
                assert await _strategy(client, base) == "random"  # watch is off
                proc.send_signal(signal.SIGHUP)
                seen: list[str] = []

                async def poll() -> None:
                    seen.append(await _strategy(client, base))

                for _ in range(100):
                    await poll()
                    if seen[-1] == "round_robin":
                        break
                    await asyncio.sleep(0.05)
                async with client.get(f"{base}/x") as response:
                    assert response.status == 200
        finally:
            code = stop(proc)
    output = log.read_text()
    assert seen[-1] == "round_robin", output
    assert code == 0, output
    assert "config reloaded (signal): strategy round_robin" in output


async def _strategy(client: aiohttp.ClientSession, base: str) -> str:
    async with client.get(f"{base}/admin/replicas") as response:
        strategy: str = (await response.json())["strategy"]
        return strategy


async def test_connections_past_the_limit_get_a_503_and_are_closed(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        port = free_port()
        path = tmp_path / "g.yaml"
        config = {
            "listen": {"port": port},
            "replicas": [{"url": replicas[0].url}],
            "limits": {"max_connections": 2},
        }
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc)
            await asyncio.sleep(0.1)  # the probe's connection is closed
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            refused = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            held[0][1].close()
            await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as client:
                async with client.get(f"http://127.0.0.1:{port}/x") as response:
                    served = response.status
            for _, w in held[1:]:
                w.close()
        finally:
            stop(proc)
    assert refused.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b'"too_many_connections"' in refused
    assert served == 200


async def test_sigterm_lets_requests_in_flight_finish_then_exits_zero(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,):
        port = free_port()
        path = tmp_path / "g.yaml"
        path.write_text(
            yaml.safe_dump({"listen": {"port": port}, "replicas": [{"url": replica.url}]})
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            await wait_http_ok(f"{base}/healthz", proc)
            async with aiohttp.ClientSession() as client:
                held = asyncio.create_task(client.get(f"{base}/hold"))
                while replica.in_flight == 0:
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                assert proc.poll() is None, "exited with a request in flight"
                async with aiohttp.ClientSession() as fresh:
                    try:
                        async with fresh.get(f"{base}/healthz") as late:
                            refused = False
                            await late.read()
                    except aiohttp.ClientConnectionError:
                        refused = True
                replica.release.set()
                response = await asyncio.wait_for(held, 10)
                status = response.status
                response.release()
            code = await asyncio.to_thread(proc.wait, 15)
        finally:
            stop(proc)
    assert status == 200
    assert refused, "a new connection was accepted while draining"
    assert code == 0


async def test_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "g.yaml"
        path.write_text(yaml.safe_dump({"listen": {"port": port}, **GOOD}))
        result = await asyncio.to_thread(_run_gateway, path)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"infergate gateway: cannot listen on 127.0.0.1:{port}: ")
    )


SECRET = "hunter2-Kx9"


@pytest.mark.parametrize(
    "content",
    [
        {**GOOD, "jobs": {"store": f"mysql://admin:{SECRET}@db/jobs"}},
        {**GOOD, "jobs": {"store": f"postgresql://admin@db:x/jobs?password={SECRET}"}},
        {"replicas": [{"url": f"http://admin:{SECRET}@127.0.0.1:9001"}]},
    ],
)
def test_a_start_up_error_never_shows_a_credential(content: Any, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    result = _run_gateway(path)
    assert result.returncode == 2, result.stderr
    assert ":***@" in result.stderr or "password=***" in result.stderr, result.stderr
    assert SECRET not in result.stderr + result.stdout


BOMB = "".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
        *(f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in itertools.pairwise("abcdefgh")),
        "replicas: [{url: 'http://127.0.0.1:9001'}]\nlisten: *h\n",
    ]
)  # 358 bytes, 43 million values once expanded: 19 s and 360 MB to refuse before


def test_an_alias_bomb_is_refused_at_start_up_in_a_moment_and_little_memory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    # A parent of its own, so its peak memory is the gateway's alone (RUSAGE_CHILDREN).
    measure = (
        "import resource, subprocess, sys, time;"
        "t = time.monotonic();"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=15);"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024;"
        "print(r.returncode, round(time.monotonic() - t, 2), peak);"
        "print(r.stderr, end='')"
    )
    result = subprocess.run(
        [sys.executable, "-c", measure, str(BIN / "infergate"), "gateway", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr  # 1: the 15 s passed (19 s before)
    first, stderr = result.stdout.split("\n", 1)
    code, seconds, peak_mb = first.split()
    assert code == "2", stderr
    assert "aliases expand to more than 10000 values" in stderr
    assert float(seconds) < 10  # the process's start included; the refusal takes milliseconds
    assert int(peak_mb) < 150  # 360 MB before
