"""Real servers for tests, started on loopback for the session and removed after.

A pytest plug-in (conftest.py lists it in `pytest_plugins`): each server is a context
manager that starts the real program in a temporary folder, listening on 127.0.0.1 only,
plus a fixture that skips, saying which program is missing, when it is not installed
(`.ci/run` installs them). Nothing here talks to any other address.

- `postgres_server` (session): a PostgreSQL cluster made by `initdb`, run by `pg_ctl`;
  `postgres_database` (per test): the name of a fresh database on it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


class ServerError(RuntimeError):
    """A server program failed; the message holds its output."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """The account a server runs as, or None for the current one. PostgreSQL refuses to run
    as root, so under root (CI containers) it runs as `postgres` (the Debian package's
    account) or, without one, `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    return None


def _as_user(user: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


def _private_dir(prefix: str, user: str | None) -> Path:
    """A new folder under the system temp dir owned by `user`. Not under pytest's tmp_path:
    that one is private to root, so another account could not reach it, and a unix socket
    path must stay under about 100 characters."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if user:
        shutil.chown(path, user, user)
    return path


def postgres_bin_dir() -> Path | None:
    """The folder holding `initdb` and `pg_ctl`: the one on PATH, else the newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH); None when absent."""
    initdb = shutil.which("initdb")
    if initdb:
        folder = Path(initdb).resolve().parent
        if (folder / "pg_ctl").exists():
            return folder
    versions = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    versions.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    for initdb_path in reversed(versions):
        folder = Path(initdb_path).parent
        if (folder / "pg_ctl").exists():
            return folder
    return None


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL server: TCP on 127.0.0.1:`port`, password authentication."""

    host: str
    port: int
    user: str
    password: str
    data_dir: Path
    socket_dir: Path

    def url(self, database: str = "postgres", scheme: str = "postgresql") -> str:
        """A connection URL; `scheme` may name a driver (SQLAlchemy's
        "postgresql+psycopg2")."""
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> Any:
        """A psycopg2 connection (autocommit) to `database`, over TCP like a client."""
        import psycopg2

        con = psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            connect_timeout=10,
        )
        con.autocommit = True
        return con

    def create_database(self, name: str) -> str:
        """Create the database `name` (a plain identifier) and return the name."""
        con = self.connect()
        try:
            with con.cursor() as cur:
                cur.execute(f'create database "{name}"')
        finally:
            con.close()
        return name


@contextlib.contextmanager
def running_postgres(bin_dir: Path, attempts: int = 3) -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL cluster; stop it (fast shutdown) and delete it after.

    A new cluster in a private temp folder, listening on 127.0.0.1 at a free port, its unix
    socket in that folder (never the system's /var/run/postgresql), run by a non-root
    account. Durability is switched off: the cluster lives as long as the test session."""
    user = _server_user()
    base = _private_dir("feed-pg-", user)
    data, sockets, log = base / "data", base / "sock", base / "server.log"
    password = secrets.token_hex(16)
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    if user:
        shutil.chown(pwfile, user, user)
    run = _runner(user)
    started = False
    try:
        run(["mkdir", "-m", "700", str(data), str(sockets)])
        run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "feed",
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        for attempt in range(attempts):
            port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                run(
                    [
                        str(bin_dir / "pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(log),
                        "-w",
                        "-t",
                        "60",
                        "-o",
                        options,
                        "start",
                    ]
                )
            except ServerError as exc:
                # Another process may have taken the port between asking and binding.
                if attempt == attempts - 1:
                    raise ServerError(f"{exc}\nPostgreSQL's log:\n{_read(log)}") from None
                continue
            started = True
            break
        yield PostgresServer("127.0.0.1", port, "feed", password, data, sockets)
    finally:
        try:
            if started:
                run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _runner(user: str | None) -> Callable[[list[str]], None]:
    """Runs a command as `user`; a failure raises with the command's own output."""

    def run(argv: list[str]) -> None:
        done = subprocess.run(_as_user(user, argv), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ServerError(
                f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
            )

    return run


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        return f"(unreadable: {exc})"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the test session (skipped when it is not installed)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL is not installed: no initdb/pg_ctl on PATH or in "
            "/usr/lib/postgresql/*/bin (.ci/run installs the Debian package postgresql)"
        )
    with running_postgres(bin_dir) as server:
        yield server


@pytest.fixture()
def postgres_database(postgres_server: PostgresServer) -> str:
    """The name of a new, empty database on `postgres_server`, this test's own."""
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:12]}")
