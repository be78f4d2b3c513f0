"""A throwaway PostgreSQL server for the DuckLake store's tests: Debian's ``postgresql`` binaries, a cluster
in a temporary folder, 127.0.0.1 on a free port, trust authentication, stopped and removed afterwards."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def postgres_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: on the PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parent.parent.name)
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class PostgresServer:
    bindir: Path
    port: int
    as_user: tuple[str, ...]

    def dsn(self, database: str) -> str:
        """The libpq connection string of one database on this server."""
        return f"dbname={database} host=127.0.0.1 port={self.port} user=postgres"

    def create_database(self, database: str) -> str:
        subprocess.run(
            [*self.as_user, str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
             "postgres", database],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return self.dsn(database)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a server and yield it; stop it and delete its files on exit.

    PostgreSQL refuses to run as root, so a root caller runs the server as the ``postgres`` system user
    that Debian's package creates."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql` (Debian) provides initdb")
    base = Path(tempfile.mkdtemp(prefix="jpslm-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = base / "data"
    started = False
    try:
        subprocess.run(
            [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
             "--no-sync"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-o",
             f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c max_connections=200", "start"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        started = True
        yield PostgresServer(bindir, port, tuple(as_user))
    finally:
        if started:
            subprocess.run(
                [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                check=False, capture_output=True,
            )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)
