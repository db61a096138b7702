"""The Dagster instance `feed-dagster run` records its runs in, and why it cannot open.

DAGSTER_HOME's dagster.yaml decides where runs are kept (SQLite files in that folder by
default, PostgreSQL with deploy/postgres). Nothing here imports Dagster until an instance
is opened, so the commands that only read feeds stay quick to start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dagster as dg


def run_instance() -> dg.DagsterInstance:
    """The Dagster instance of DAGSTER_HOME, or an ephemeral one without it."""
    import dagster as dg

    # With DAGSTER_HOME set (the Makefile sets it) runs show up in the UI's history.
    if os.environ.get("DAGSTER_HOME"):
        Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.ephemeral()


# The variable deploy/postgres/dagster.yaml reads its database URL from, and its form.
POSTGRES_URL_VARIABLE = "FEED_DAGSTER_POSTGRES_URL"
POSTGRES_URL_FORM = "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DATABASE"


def instance_problem() -> str | None:
    """Why the Dagster instance of DAGSTER_HOME cannot be opened, naming the setting to
    fix; None when it opens.

    `run` asks once before building: every step opens the instance in a process of its
    own, and a missing variable or an unreachable database would otherwise fail each of
    them with Dagster's traceback. Opening it also creates the run storage's tables once,
    before the shard processes start in parallel."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return None
    config = Path(home) / "dagster.yaml"
    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if url and config.exists() and POSTGRES_URL_VARIABLE in config.read_text():
        problem = postgres_url_problem(url)
        if problem:
            return f"{POSTGRES_URL_VARIABLE} (read by {config}) {problem}"
    try:
        instance = run_instance()
    except Exception as exc:
        text = str(exc)
        if "environment variable" in text and "which is not set" in text:
            # Dagster's message names the variable; say where it is read and what it wants.
            start = text.index("environment variable")
            missing = text[start:].split('"')[1] if '"' in text[start:] else "?"
            hint = (
                f" (a database URL: {missing}={POSTGRES_URL_FORM})"
                if missing == POSTGRES_URL_VARIABLE
                else ""
            )
            return (
                f"the Dagster instance in {config} reads the environment variable {missing}, "
                f"which is not set: set it{hint}, or point DAGSTER_HOME at another instance "
                "folder (unset, runs are kept in memory only)"
            )
        if _is_database_error(exc):
            return (
                f"the Dagster instance in {config} cannot connect to its run storage database: "
                f"{_root_cause(exc)}\nCheck the database settings in {config} (for "
                f"deploy/postgres: {POSTGRES_URL_VARIABLE}={POSTGRES_URL_FORM}): the "
                "server must be up and reachable from this machine, the database must exist "
                "and the user may log in to it"
            )
        return f"cannot open the Dagster instance in {config}: {_root_cause(exc)}"
    instance.dispose()
    return None


def postgres_url_problem(url: str) -> str | None:
    """What is wrong with `url` as the run storage's database URL, or None.

    dagster-postgres talks to PostgreSQL through psycopg2 (its NOTIFY statements do not run
    on psycopg 3), and since SQLAlchemy 2.1 a plain postgresql:// URL means psycopg 3: the
    URL has to name the driver."""
    import sqlalchemy.engine
    import sqlalchemy.exc

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return "is not a database URL: write it as " + POSTGRES_URL_FORM
    shown = parsed.render_as_string(hide_password=True)
    if parsed.drivername != "postgresql+psycopg2":
        return (
            f"is {shown}, which does not name the psycopg2 driver: write it as "
            f"{POSTGRES_URL_FORM} (dagster-postgres runs on psycopg2 only)"
        )
    return None


def _is_database_error(exc: BaseException) -> bool:
    """True when `exc` or what caused it comes from the database connection (SQLAlchemy's
    errors, or dagster-postgres giving up after its retries)."""
    import sqlalchemy.exc

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.SQLAlchemyError):
            return True
        if type(seen).__name__ == "DagsterPostgresException":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _root_cause(exc: BaseException) -> str:
    """The first lines of the innermost error: the driver's own words ("connection
    refused", "password authentication failed", "database ... does not exist"), without
    SQLAlchemy's wrapping."""
    while exc.__cause__ is not None or getattr(exc, "orig", None) is not None:
        exc = exc.__cause__ or exc.orig
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(exc).__name__
