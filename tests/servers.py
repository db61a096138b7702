"""Real servers for tests, started on loopback for the session and removed after.

A pytest plug-in (conftest.py lists it in `pytest_plugins`): each server is a context
manager that starts the real program in a temporary folder, listening on 127.0.0.1 only,
plus a fixture that skips, saying which program is missing, when it is not installed
(`.ci/run` installs them). Nothing here talks to any other address.

- `postgres_server` (session): a PostgreSQL cluster made by `initdb`, run by `pg_ctl`;
  `postgres_database` (per test): the name of a fresh database on it.
- `s3_server` (session): an S3-compatible server, moto's in server mode, in its own
  process; `s3_bucket` (per test): a fresh bucket on it, with the AWS_* variables of this
  test pointing at it.
- `redis_server` (session): a Redis server (`redis-server`, nothing saved to disk), the
  broker of the Celery executor's tests; `redis_url` (per test): a URL of a database of
  it emptied for the test.
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
import sys
import tempfile
import time
import urllib.error
import urllib.request
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


def unreachable_s3_endpoint(monkeypatch: Any) -> None:
    """Point the AWS client at a loopback port nothing listens on (connection refused), with
    one attempt: botocore's retries would only lengthen the wait."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")


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


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server (moto) at `endpoint`, on 127.0.0.1. Every request it
    serves is appended to `recording` (moto's recorder), so a test can count them."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    recording: Path

    def env(self) -> dict[str, str]:
        """The standard variables an AWS client (botocore, s3fs) reads to reach it."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # Loopback only, even where an HTTP(S)_PROXY is set.
            "NO_PROXY": "127.0.0.1",
        }

    def client(self) -> Any:
        """A boto3 S3 client on the server, to look at objects as another reader would."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request recorded so far, oldest first."""
        import json
        from urllib.parse import urlsplit

        text = self.recording.read_text() if self.recording.exists() else ""
        # moto writes each entry and then its newline in two writes, so two requests served
        # at once (concurrent uploads) may leave two entries on one line: read them as a
        # stream of JSON values, not line by line.
        decoder, entries, at = json.JSONDecoder(), [], 0
        while True:
            while at < len(text) and text[at].isspace():
                at += 1
            if at == len(text):
                break
            entry, at = decoder.raw_decode(text, at)
            entries.append(entry)
        return [(e["method"], urlsplit(e["url"]).path) for e in entries]


# Loopback only: no HTTP(S)_PROXY of the environment is ever asked to relay a request.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_until_answers(proc: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    """Whether the server answers at `url` before `timeout` seconds pass or it exits."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with _DIRECT.open(url, timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def running_moto(attempts: int = 3, timeout: float = 30.0) -> Iterator[S3Server]:
    """Start moto's S3-compatible server (`python -m moto.server`) as a separate process on
    127.0.0.1 at a free port, with request recording on; stop it and delete its folder
    after."""
    base = Path(tempfile.mkdtemp(prefix="feed-s3-"))
    log, recording = base / "server.log", base / "requests.jsonl"
    env = {**os.environ, "MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording)}
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(attempts):
            port = free_port()
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=base,
                )
            endpoint = f"http://127.0.0.1:{port}"
            if _wait_until_answers(proc, f"{endpoint}/moto-api/", timeout):
                break
            _stop(proc)
            # Another process may have taken the port between asking and binding.
            if attempt == attempts - 1:
                raise ServerError(f"moto server did not start on {endpoint}:\n{_read(log)}")
        yield S3Server(endpoint, "feed-test", secrets.token_hex(16), "us-east-1", recording)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server for the test session (skipped when moto is missing)."""
    pytest.importorskip(
        "moto.server", reason="moto[server] is not installed (the project's dev extra has it)"
    )
    with running_moto() as server:
        yield server


@pytest.fixture()
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a new, empty bucket on `s3_server`, this test's own; the AWS_* variables
    point at the server for the test, and no AWS profile or config file of the machine is
    read."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@dataclass(frozen=True)
class RedisServer:
    """A running Redis server on 127.0.0.1:`port`, without a password."""

    host: str
    port: int
    log: Path

    def url(self, database: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{database}"

    def command(self, *args: str) -> str:
        """One command in Redis's protocol over a plain socket (no client library needed);
        the first line of the reply."""
        with socket.create_connection((self.host, self.port), timeout=5) as s:
            request = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
            s.sendall(request.encode())
            return s.makefile("rb").readline().decode().strip()


@contextlib.contextmanager
def running_redis(binary: str, attempts: int = 3, timeout: float = 15.0) -> Iterator[RedisServer]:
    """Start `redis-server` in the foreground as a child process, in a temp folder, on
    127.0.0.1 at a free port, with persistence off (no RDB snapshot, no append-only file);
    stop it and delete its folder after."""
    base = Path(tempfile.mkdtemp(prefix="feed-redis-"))
    log = base / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(attempts):
            port = free_port()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--daemonize", "no", "--dir", str(base)]
            with log.open("ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=base)
            server = RedisServer("127.0.0.1", port, log)
            if _wait_until_pong(proc, server, timeout):
                break
            _stop(proc)
            # Another process may have taken the port between asking and binding.
            if attempt == attempts - 1:
                raise ServerError(f"redis-server did not start on port {port}:\n{_read(log)}")
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def _wait_until_pong(proc: subprocess.Popen[bytes], server: RedisServer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if server.command("PING") == "+PONG":
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis server for the test session (skipped when it is not installed)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "Redis is not installed: no redis-server on PATH (.ci/run installs the Debian "
            "package redis-server)"
        )
    with running_redis(binary) as server:
        yield server


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    """The URL of database 0 of `redis_server`, emptied for this test: no task or result a
    previous test left is delivered to this one's workers."""
    assert redis_server.command("FLUSHDB") == "+OK"
    return redis_server.url(0)
