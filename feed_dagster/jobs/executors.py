"""The executor of jobs that name none, chosen by FEED_DAGSTER_EXECUTOR.

"celery" sends every step of such a run (each user_feeds shard among them) to Celery workers
through a broker (Redis, as tested): dagster-celery's executor, with the broker read from
FEED_DAGSTER_CELERY_BROKER when a run starts and asked first whether it answers."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

EXECUTOR_VARIABLE = "FEED_DAGSTER_EXECUTOR"
CELERY_BROKER_VARIABLE = "FEED_DAGSTER_CELERY_BROKER"
CELERY_BROKER_FORM = "redis://HOST:6379/0"
EXECUTORS = ("multiprocess", "spawn", "in_process", "celery")


class CeleryBrokerError(dg.DagsterError):
    """The Celery broker a run was to send its steps through does not answer."""


def default_executor() -> dg.ExecutorDefinition | None:
    """The executor of jobs that name none (the UI's "Materialize" runs, refresh_feeds, the
    automation sensor's runs and backfills).

    Unset or "multiprocess": a process per step, as Dagster's default, but forked from a
    server that imported the project once per run (`preloaded_multiprocess_executor`):
    Dagster's default spawns each step's process, which then imports torch, polars and the
    project again, and on a small world a run of quick steps spent most of its time doing
    that. "spawn" is Dagster's default unchanged, for code that must not start by a fork;
    "in_process" runs every step in the run's own process; "celery" sends each step to a
    Celery worker (see `celery_executor`)."""
    kind = os.environ.get(EXECUTOR_VARIABLE, "multiprocess")
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "multiprocess":
        return preloaded_multiprocess_executor()
    if kind == "spawn":
        return dg.multiprocess_executor
    if kind == "celery":
        if not os.environ.get(CELERY_BROKER_VARIABLE):
            raise ValueError(
                f"{EXECUTOR_VARIABLE}=celery needs the broker the workers listen on: set "
                f"{CELERY_BROKER_VARIABLE}={CELERY_BROKER_FORM}"
            )
        return celery_executor()
    raise ValueError(
        f"{EXECUTOR_VARIABLE} must be one of {', '.join(map(repr, EXECUTORS))}, got {kind!r}"
    )


# What a step process needs before it runs anything: the run worker's own entry point
# (multiprocessing re-runs the parent's __main__ in every child), the SQLite storage of the
# default instance (SQLAlchemy, Alembic) and the project with torch, polars and DuckDB.
# A module missing from another Dagster version is skipped by the forkserver, not fatal.
PRELOADED_MODULES = [
    "dagster._cli",
    "dagster._core.storage.runs.sqlite",
    "dagster._core.storage.event_log.sqlite",
    "dagster._core.storage.schedules.sqlite",
    "feed_dagster.definitions",
]


def preloaded_multiprocess_executor() -> dg.ExecutorDefinition:
    """Dagster's multiprocess executor, its step processes forked from a server that has
    imported the project once per run, instead of each spawned process importing torch,
    polars, dagster and the definitions again (Dagster's default start method, "spawn").
    The server only imports: no thread pool or connection exists yet when it forks, so a
    step starts as cleanly as a spawned one."""
    return dg.multiprocess_executor.configured(
        {"start_method": {"forkserver": {"preload_modules": PRELOADED_MODULES}}},
        name="multiprocess_preloaded",
    )


def celery_broker_problem(url: str, timeout: float = 3.0) -> str | None:
    """Why the broker at `url` cannot be used, or None when it answers. At most one retry,
    at once: kombu's own default retries for ever, and a run would then hang without a word
    instead of failing."""
    from kombu import Connection

    try:
        connection = Connection(url, connect_timeout=timeout)
        shown = connection.as_uri()  # the password masked
    except Exception as exc:  # kombu raises the transport's own errors, whatever they are
        return f"no broker URL that kombu can read ({type(exc).__name__})"
    try:
        with connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
    except Exception as exc:
        return f"the Celery broker {shown}, which cannot be reached: {type(exc).__name__}: {exc}"
    return None


def celery_workers_answering(url: str, timeout: float = 1.0) -> int:
    """How many Celery workers on the broker at `url` answer a ping within `timeout` seconds
    (a solo worker busy with a step does not answer until it is done)."""
    from celery import Celery

    app = Celery(broker=url, backend=url)
    try:
        return len(app.control.ping(timeout=timeout) or [])
    finally:
        app.close()


def _check_broker(init_context: Any) -> dg.Executor:
    from dagster_celery import celery_executor as dagster_celery_executor

    broker = init_context.executor_config.get("broker") or ""
    problem = celery_broker_problem(broker)
    if problem:
        raise CeleryBrokerError(
            f"{CELERY_BROKER_VARIABLE} names {problem}. Start the broker (and the workers: "
            "`dagster-celery worker start -A dagster_celery.app -y deploy/celery/celery.yaml`), "
            f"or set {CELERY_BROKER_VARIABLE} to the broker the workers listen on "
            f"({CELERY_BROKER_FORM}), or unset {EXECUTOR_VARIABLE} to run on this machine"
        )
    return dagster_celery_executor.executor_creation_fn(init_context)


def celery_executor() -> dg.ExecutorDefinition:
    """dagster-celery's executor, its broker and results backend the URL in
    FEED_DAGSTER_CELERY_BROKER, which it asks before the run sends any step."""
    from dagster_celery.executor import CELERY_CONFIG

    checked = dg.executor(
        name="celery",
        config_schema=CELERY_CONFIG,
        requirements=dg.multiple_process_executor_requirements(),
    )(_check_broker)
    # The broker is the results backend too, so a worker needs nothing but that one URL.
    # Read from the environment of the process that runs the job, when the run starts, like
    # the workers' deploy/celery/celery.yaml: the URL, password included, is never part of
    # the definitions or of a run's stored config.
    url = {"env": CELERY_BROKER_VARIABLE}
    return checked.configured({"broker": url, "backend": url}, name="celery")
