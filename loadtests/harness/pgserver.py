"""A throwaway PostgreSQL server for the shared job store's tests and benchmarks: Debian's
`postgresql` binaries, a cluster made with initdb in a temporary folder, listening on a loopback
port and a socket in that folder, stopped and deleted after. As root, the server runs as the
`postgres` user the package creates, because PostgreSQL refuses to run as root. Where no
PostgreSQL is installed, `start_server` raises FileNotFoundError saying how to get it.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from loadtests.harness.runner import free_port_block

SUPERUSER = "infergate"
# For tests, where durability is not looked at (the server itself is never killed): speed wins.
NO_SYNC = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
MISSING = (
    "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin): "
    "`make test` as root installs Debian's postgresql, or apt-get install postgresql"
)


def find_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, or Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("pg_ctl") is not None:
        return Path(on_path).resolve().parent
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


@dataclass
class PostgresServer:
    bin_dir: Path
    folder: Path
    port: int
    run_as: str | None  # the user the server runs as (root cannot), None: ourselves
    durable: bool = True  # False: no fsync (tests)

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _command(self, *argv: str) -> list[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return [*prefix, *argv]

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            self._command(*argv), capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stdout}{done.stderr}")

    def version(self) -> str:
        """`15.18`, say: what `postgres --version` prints last."""
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True,
            timeout=30, check=True,
        ).stdout  # fmt: skip
        return out.split(")", 1)[-1].split()[0]

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C",
            )  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
        if not self.durable:
            options += " " + NO_SYNC
        self._run(
            str(self.bin_dir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data),
            "-l", str(self.folder / "server.log"), "-o", options,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop it now (in-flight sessions are cut, as a crash of the server would)."""
        if (self.data / "postmaster.pid").exists():
            self._run(
                str(self.bin_dir / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data)
            )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_server(*, durable: bool = True) -> PostgresServer:
    """A running server in a new temporary folder; the caller removes it (an exit hook does
    too, so an interrupted run leaves no server behind)."""
    bin_dir = find_binaries()
    if bin_dir is None:
        raise FileNotFoundError(MISSING)
    folder = Path(tempfile.mkdtemp(prefix="infergate-pg-"))
    run_as = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise FileNotFoundError(
                "running as root and no 'postgres' user to run PostgreSQL as (Debian's "
                "postgresql package creates it)"
            ) from None
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = "postgres"
    server = PostgresServer(bin_dir, folder, free_port_block(1, start=25000), run_as, durable)
    atexit.register(server.remove)
    try:
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


async def fresh_database(server: PostgresServer) -> str:
    """A new empty database on `server`; its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    db = await asyncpg.connect(server.url)
    try:
        await db.execute(f'CREATE DATABASE "{name}"')
    finally:
        await db.close()
    return server.url_of(name)
