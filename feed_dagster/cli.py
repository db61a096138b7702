"""The `feed-dagster` command: build everything, read feeds, write demo data."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import sys
import textwrap
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.paths import ARTIFACTS_URI_VARIABLE, MODELS_URI_VARIABLE, DataRoot, data_root
from feed_dagster.progress import PlainProgress, Progress, make_progress


def storage() -> DataRoot:
    """The one storage root of every command: FEED_DAGSTER_DATA (default ./data), resolved
    once. `run` builds the asset graph with a storage resource of this root, and the
    commands that only read (or drop files) take their paths from the same layout the
    resource uses, without importing Dagster (about 1.5 s, for `feed` more than its work)."""
    return DataRoot(data_root())


def _instance():
    import dagster as dg

    # With DAGSTER_HOME set (the Makefile sets it) runs show up in the UI's history; its
    # dagster.yaml decides where they are kept (SQLite files in that folder by default,
    # PostgreSQL with deploy/postgres).
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
        instance = _instance()
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


class BuildFailed(RuntimeError):
    """A step of `run` failed; its errors have been printed."""


class PublishRefused(BuildFailed):
    """The publish guard refused the new generation; the live serving file is unchanged."""


# The name `dg.materialize` gives its job: runs of `run` look the same in the UI's history.
EPHEMERAL_JOB = "__ephemeral_asset_job__"
# (phase, kind, step, payload): kind "start" | "done" (payload (seconds, ok)) | "log" (text).
StepEvent = tuple[str, str, str, Any]


def _step_listener(
    phase: str, emit: Callable[[StepEvent], None], log_level: str
) -> Callable[[Any], None]:
    """An instance event listener that turns a run's events into StepEvents (also fed the
    entries of a run's event log as they are read back).

    Log lines of steps at INFO up to (not including) the console's `log_level` are passed
    on: those at or above it the Dagster console logger prints already."""
    import logging

    import dagster as dg

    threshold = logging.getLevelName(log_level.upper())
    if not isinstance(threshold, int):
        threshold = logging.WARNING
    started: dict[str, float] = {}
    ends = {
        dg.DagsterEventType.STEP_SUCCESS: True,
        dg.DagsterEventType.STEP_FAILURE: False,
    }

    def on_event(entry: Any) -> None:
        # Runs inside Dagster's event handling: it must never raise into the run.
        try:
            step = entry.step_key
            if step is None:
                return
            kind = entry.dagster_event_type
            # The events' own times, not when they are seen: read back from the event log
            # (steps on Celery workers), a step's events arrive a poll late.
            if kind == dg.DagsterEventType.STEP_START:
                started[step] = entry.timestamp
                emit((phase, "start", step, None))
            elif kind in ends:
                seconds = entry.timestamp - started.pop(step, entry.timestamp)
                emit((phase, "done", step, (seconds, ends[kind])))
            elif kind is None and logging.INFO <= entry.level < threshold:
                emit((phase, "log", step, entry.user_message))
        except Exception:  # progress is best effort; the run must go on regardless
            pass

    return on_event


def _dispatch(progress: Progress, event: StepEvent) -> None:
    phase, kind, step, payload = event
    if kind == "start":
        progress.step_started(phase, step)
    elif kind == "done":
        progress.step_finished(phase, step, *payload)
    elif kind == "log":
        progress.step_message(phase, step, payload)


# Set in each worker process of `run`: where its StepEvents go (the parent shows them).
_WORKER_EVENTS: Any = None


def _worker_init(events: Any) -> None:
    global _WORKER_EVENTS
    _WORKER_EVENTS = events


def _run_step(
    label: str,
    which: str,
    partition_key: str | None,
    log_level: str,
    root: Path,
    emit: Callable[[StepEvent], None] | None = None,
) -> str:
    """Materialise one step of `run` in this process, under the storage root `root`;
    returns its report lines.

    `which`: "sources" (the source's tables), "derived" (the rest upstream of the feeds),
    "shard" (one user_feeds partition), "publish" or "quality" (feed_quality). `emit`
    receives the steps' progress (in a worker process: the queue the pool was started
    with). Raises BuildFailed(report) when anything fails.
    """
    import dagster as dg

    from feed_dagster.definitions import build_definitions
    from feed_dagster.jobs.automation import (
        DERIVED_UPSTREAM,
        FEED_QUALITY,
        FEEDS,
        SOURCE_TABLES,
    )
    from feed_dagster.resources.storage import StorageResource

    defs = build_definitions(StorageResource(root=str(root)))
    selection = {
        "sources": SOURCE_TABLES,
        "derived": DERIVED_UPSTREAM,
        "shard": FEEDS,
        "publish": dg.AssetSelection.assets("published_feeds"),
        "quality": FEED_QUALITY,
    }[which]
    if emit is None and _WORKER_EVENTS is not None:
        emit = _WORKER_EVENTS.put
    t0 = time.perf_counter()
    # What dg.materialize does, with a run id known up front, so a listener can follow the
    # run's events as they happen.
    job = dg.Definitions(
        jobs=[dg.define_asset_job(EPHEMERAL_JOB, selection=selection)],
        assets=[*defs.assets, *defs.asset_checks],
        resources=defs.resources,
    ).resolve_job_def(EPHEMERAL_JOB)
    instance = _instance()
    run_id = str(uuid.uuid4())
    if emit is not None:
        instance.add_event_listener(run_id, _step_listener(label, emit, log_level))
    result = job.execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        instance=instance,
        partition_key=partition_key,
        raise_on_error=False,
        run_id=run_id,
    )
    return _step_report(label, time.perf_counter() - t0, result)


def _step_report(label: str, seconds: float, result: Any) -> str:
    """The report lines of a finished run of `run` (an ExecuteInProcessResult, or the
    JobExecutionResult of a run on the engine); raises PublishRefused when the publish guard
    refused, BuildFailed(report) when anything else failed."""
    built = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    lines = [f"- {label}: built {', '.join(built)} in {seconds:.1f}s"]
    lines += [
        f"  check {c.check_name} FAILED: {c.description}"
        for c in result.get_asset_check_evaluations()
        if not c.passed
    ]
    refused = [c for c in result.get_asset_check_evaluations() if c.check_name == "publish_guard"]
    failures = result.get_step_failure_events()
    fatal = False
    for event in failures:
        error = event.step_failure_data.error
        if error is not None and error.cls_name == "DagsterAssetCheckFailedError":
            # A blocking check did its job (e.g. the promotion gate refused a ranker): what
            # depends on it was skipped, and the rest of the build goes on.
            lines.append(f"  blocking check failed in {event.step_key}; dependants skipped")
            continue
        if event.step_key == "published_feeds" and any(not c.passed for c in refused):
            # The guard did its job: report it apart from a crash (the reasons are in the
            # check line above), so `run` can go on and show the live feeds.
            lines.append("  publish refused by publish_guard; the live serving file is unchanged")
            raise PublishRefused("\n".join(lines))
        fatal = True
        lines.append(f"  FAILED {event.step_key}: {error_text(error)}")
    if not result.success and not failures:
        # The run failed before or around its steps (an executor that could not start, a
        # broker gone mid-run): no step says why, the run's failure does.
        fatal = True
        lines.append(f"  FAILED run {result.run_id}: {_run_failure_text(result)}")
    if fatal:
        raise BuildFailed("\n".join(lines))
    return "\n".join(lines)


def _run_failure_text(result: Any) -> str:
    import dagster as dg

    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.RUN_FAILURE:
            data = event.event_specific_data
            error = getattr(data, "error", None)
            return error_text(error) if error is not None else event.message or "run failed"
    return "the run failed without a step failure"


def error_text(error: object) -> str:
    """The message of a step's error and of the errors that caused it: Dagster wraps what
    the asset raised ("Error occurred while executing op ...") and keeps it as the cause."""
    parts = []
    while error is not None:
        parts.append(str(getattr(error, "message", "")).strip())
        error = getattr(error, "cause", None)
    return "\n    ".join(p for p in parts if p)


def materialize_everything(
    log_level: str = "WARNING",
    workers: int | None = None,
    progress: Progress | None = None,
    root: Path | None = None,
) -> str | None:
    """Materialise the whole asset graph under the storage root `root` (default: the
    commands' `storage()`): everything upstream of the feeds, then every user shard of
    user_feeds (shards in parallel worker processes, as an executor would fan them out),
    then the publish, then the feed-quality evaluation. `progress` shows each phase, step,
    shard and step log line as it happens (default: plain lines on stdout).

    Returns None, or the report of a publish the guard refused (the build goes on: the
    live generation stays served and feed quality is still measured)."""
    from feed_dagster.assets.feeds import user_shards

    own = progress is None
    progress = progress or PlainProgress()
    root = root or storage().data_root()
    try:
        return _materialize_phases(
            log_level, workers, progress, user_shards.get_partition_keys(), root
        )
    finally:
        if own:
            progress.close()


def _materialize_phases(
    log_level: str, workers: int | None, progress: Progress, shards: list[str], root: Path
) -> str | None:
    def phase(label: str, which: str, note: str = "", fresh: bool = False) -> str:
        progress.phase_started(label, note)
        if fresh:
            task = [(label, which, None)]
            (report,) = _in_fresh_processes(log_level, progress, root, task, workers=1)
        else:
            emit = functools.partial(_dispatch, progress)
            report = _run_step(label, which, None, log_level, root, emit)
        progress.phase_finished(label, report)
        return report

    # The heavy phases run in processes of their own (see _in_fresh_processes); publish and
    # feed quality run here, after them, where a process start would only add time.
    phase("sources", "sources", "generate or load the world, check its tables", fresh=True)
    phase("models and vectors", "derived", "training takes a few minutes", fresh=True)
    if shard_engine():
        # Each shard one run of refresh_feeds, as the schedule and the sensor start them.
        runs = workers or shard_runs_at_once(len(shards))
        progress.shards_started(len(shards), runs, "runs at a time on the Celery workers")
        _shards_on_engine(log_level, progress, root, shards, runs)
    else:
        labels = [(f"user_feeds shard {k}", "shard", k) for k in shards]
        workers = workers or min(len(shards), os.cpu_count() or 1)
        progress.shards_started(len(shards), workers)
        _in_fresh_processes(log_level, progress, root, labels, workers, progress.shard_finished)
    refused = None
    try:
        phase("publish", "publish")
    except PublishRefused as exc:
        refused = str(exc)
        progress.error(refused)
    try:
        phase("feed quality", "quality", "held-out recall vs chronological and popularity")
    except BuildFailed as exc:
        # Evaluation only: the feeds are published already, so report and carry on.
        progress.error(f"{exc}\n  feed quality failed; the published feeds are unaffected")
    return refused


def _in_fresh_processes(
    log_level: str,
    progress: Progress,
    root: Path,
    tasks: list[tuple[str, str, str | None]],
    workers: int,
    on_finished: Callable[[str, str, int, int], None] | None = None,
) -> list[str]:
    """`_run_step(label, which, partition_key)` under `root` for each task, each in a new
    process, at most `workers` at a time; returns the reports in task order. A fresh process
    per task gives each step's memory back to the system when it ends, so the peak of a
    build is the peak of its largest step (plus the idle parent), not the sum of what
    earlier steps left behind. Step events come back over a queue, so progress shows while
    they run."""
    import queue
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    # spawn, not fork: the parent has used torch's thread pool, which a fork can deadlock.
    ctx = get_context("spawn")
    events = ctx.Queue()

    def drain(timeout: float) -> None:
        try:
            while True:
                _dispatch(progress, events.get(timeout=timeout))
                timeout = 0.0
        except queue.Empty:
            pass

    reports: dict[int, str] = {}
    with ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(events,),
        max_tasks_per_child=1,
    ) as pool:
        pending = {
            pool.submit(_run_step, label, which, key, log_level, root): i
            for i, (label, which, key) in enumerate(tasks)
        }
        while pending:
            finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain(0.05)
            for future in finished:
                i = pending.pop(future)
                try:
                    reports[i] = future.result()  # a failed step raises BuildFailed: run stops
                except BaseException:
                    drain(0.2)
                    raise
                if on_finished is not None:
                    on_finished(tasks[i][0], reports[i], len(reports), len(tasks))
        drain(0.2)  # events a worker queued just before its result came back
    events.close()
    return [reports[i] for i in range(len(tasks))]


# The variable that picks the executor of Dagster's runs (feed_dagster/jobs/executors.py),
# named here so that deciding how `run` builds its shards does not import Dagster.
EXECUTOR_VARIABLE = "FEED_DAGSTER_EXECUTOR"
# How many shard runs `run` keeps in flight on the engine (default: one per Celery worker).
SHARD_RUNS_VARIABLE = "FEED_DAGSTER_SHARD_RUNS"
# Tags of the shard runs `run` starts on the engine: the partition (what the schedule's
# runs carry) and the build they belong to, by which their events are found and followed.
PARTITION_TAG = "dagster/partition"
BUILD_TAG = "feed_dagster/build"
SHARD_JOB = "refresh_feeds"


def shard_engine() -> str | None:
    """The engine `run` hands its user_feeds shards to: "celery" when FEED_DAGSTER_EXECUTOR
    is celery, else None.

    Only Celery takes steps off this machine. With "multiprocess", "spawn" or "in_process"
    (or unset) `run` keeps its own pool: one process per shard on this machine, the fan-out
    Dagster's multiprocess executor would make there too, and `make run`'s path stays as it
    was."""
    return "celery" if os.environ.get(EXECUTOR_VARIABLE) == "celery" else None


def engine_problem() -> str | None:
    """Why `run` cannot send its shards to the configured engine, naming the setting to fix;
    None when it can (or when no engine is configured). Asked before building, so a missing
    broker is found before the models train, not minutes later."""
    if shard_engine() is None:
        return None
    from feed_dagster.jobs.executors import (
        CELERY_BROKER_FORM,
        CELERY_BROKER_VARIABLE,
        celery_broker_problem,
    )

    unset = f"or unset {EXECUTOR_VARIABLE} to build the shards on this machine"
    if not os.environ.get("DAGSTER_HOME"):
        return (
            f"{EXECUTOR_VARIABLE}=celery: the workers write the shards' events into the "
            "Dagster instance the runs are kept in; set DAGSTER_HOME to the instance folder "
            f"they share, {unset}"
        )
    url = os.environ.get(CELERY_BROKER_VARIABLE)
    if not url:
        return (
            f"{EXECUTOR_VARIABLE}=celery needs the broker the workers listen on: set "
            f"{CELERY_BROKER_VARIABLE}={CELERY_BROKER_FORM}, {unset}"
        )
    problem = celery_broker_problem(url)
    if problem:
        return f"{CELERY_BROKER_VARIABLE} names {problem}: start the broker, {unset}"
    value = os.environ.get(SHARD_RUNS_VARIABLE)
    if value and not (value.isdigit() and int(value) > 0):
        return f"{SHARD_RUNS_VARIABLE} must be a whole number of runs above 0, got {value!r}"
    return None


def shard_runs_at_once(total: int) -> int:
    """How many of `total` shard runs to keep in flight on the engine: FEED_DAGSTER_SHARD_RUNS,
    else the number of Celery workers that answer now (a solo worker runs one step at a
    time, so more runs would only wait in the queue), at least one, at most `total`."""
    value = os.environ.get(SHARD_RUNS_VARIABLE)
    if value:
        wanted = int(value)
    else:
        from feed_dagster.jobs.executors import CELERY_BROKER_VARIABLE, celery_workers_answering

        wanted = celery_workers_answering(os.environ[CELERY_BROKER_VARIABLE])
    return max(1, min(total, wanted))


def _shards_on_engine(
    log_level: str, progress: Progress, root: Path, shards: list[str], at_once: int
) -> list[str]:
    """Each shard as one run of the refresh_feeds job of feed_dagster.definitions, through
    Dagster's own execution with the job's executor (the Celery workers take the steps, as
    for the UI's and the schedule's runs), at most `at_once` runs at a time; returns the
    reports in shard order.

    Each run is started from a spawned process of its own (`_shard_run`), reused for the
    next shard: Dagster configures Python's logging as a run starts, which can deadlock
    against another run's logging in the same process. The steps' events are written by the
    workers, never passing through a process of `run`, so progress comes from reading each
    run's event log back here as it grows."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    import dagster as dg

    build = str(uuid.uuid4())
    emit = functools.partial(_dispatch, progress)
    followed: dict[str, tuple[Callable[[Any], None], Any]] = {}
    done: set[str] = set()
    reports: dict[str, str] = {}
    with dg.DagsterInstance.get() as instance:

        def follow(only: str | None = None) -> None:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={BUILD_TAG: build}))
            for run in runs:
                if run.run_id not in followed and run.run_id not in done:
                    label = f"user_feeds shard {run.tags[PARTITION_TAG]}"
                    followed[run.run_id] = (_step_listener(label, emit, log_level), None)
            for run_id, (listen, cursor) in list(followed.items()):
                if only is not None and run_id != only:
                    continue
                page = instance.get_records_for_run(run_id, cursor=cursor)
                for record in page.records:
                    listen(record.event_log_entry)
                followed[run_id] = (listen, page.cursor)

        # spawn, not fork: the parent has used torch's thread pool, which a fork can deadlock.
        with ProcessPoolExecutor(at_once, mp_context=get_context("spawn")) as pool:
            pending = {pool.submit(_shard_run, key, build, log_level, root): key for key in shards}
            try:
                while pending:
                    finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    follow()
                    for future in finished:
                        key = pending.pop(future)
                        run_id, reports[key] = future.result()  # a failed shard raises
                        follow(run_id)  # the run's last events before its report
                        followed.pop(run_id, None)
                        done.add(run_id)
                        label = f"user_feeds shard {key}"
                        progress.shard_finished(label, reports[key], len(reports), len(shards))
            except BaseException:
                # A failed shard stops `run`, as in the local pool: its events are shown,
                # runs not started yet are dropped, and those in flight are waited for as
                # they finish on the workers (a run left behind would stay "started").
                follow()
                for future in pending:
                    future.cancel()
                raise
    return [reports[key] for key in shards]


def _shard_run(key: str, build: str, log_level: str, root: Path) -> tuple[str, str]:
    """Run shard `key` as a run of refresh_feeds with the job's own executor, tagged with
    the partition and the build; returns (run id, report). Raises BuildFailed(report) when
    the run failed."""
    import dagster as dg
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    # What `dagster job execute -m feed_dagster.definitions -j refresh_feeds` runs: a worker
    # rebuilds the job from the same module in its own environment.
    job = ReconstructableRepository.for_module(
        "feed_dagster.definitions", "defs"
    ).get_reconstructable_job(SHARD_JOB)
    with warnings.catch_warnings():
        # Dagster still calls the sensors' `owners` parameter beta and says so on loading
        # them; among the progress lines that is noise.
        warnings.filterwarnings("ignore", message="Parameter `owners`")
        job.get_definition()
    run_config = {
        "loggers": {"console": {"config": {"log_level": log_level}}},
        "resources": {"storage": {"config": {"root": str(root)}}},
    }
    label = f"user_feeds shard {key}"
    t0 = time.perf_counter()
    try:
        with dg.DagsterInstance.get() as instance:
            result = dg.execute_job(
                job,
                instance=instance,
                run_config=run_config,
                tags={PARTITION_TAG: key, BUILD_TAG: build},
            )
    except Exception as exc:  # Dagster refused to start the run
        raise BuildFailed(f"- {label}: FAILED to start: {exc}") from None
    return result.run_id, _step_report(label, time.perf_counter() - t0, result)


def print_warehouse_summary(path: Location) -> None:
    from feed_dagster.data.warehouse import connect_read_only

    try:
        con = connect_read_only(path)
    except FileNotFoundError:
        print(f"no warehouse at {path}")
        return
    try:
        tables = con.execute(
            "select table_name from information_schema.tables where table_schema = 'main' "
            "order by table_name"
        ).fetchall()
        print(f"\nwarehouse {path}")
        for (name,) in tables:
            n = con.execute(f'select count(*) from main."{name}"').fetchone()[0]
            print(f"  {name:<22} {n:>12,} rows")
    finally:
        con.close()


def print_sample_feed(path: Path, user_id: int | None = None, limit: int = 10) -> bool:
    """One user's feed from the serving file (by default the user with the most engagement).

    Returns False, after saying what happened and what to do, when there is nothing to show:
    no serving file, a file without feeds, or a user without a feed.
    """
    from feed_dagster.serving.read import FeedNotPublishedError, connect, get_feed

    try:
        if user_id is None:
            con = connect(path)
            try:
                row = con.execute(
                    "select user_id from serving.feed_users "
                    "order by in_network > 0 desc, posts desc, user_id limit 1"
                ).fetchone()
            finally:
                con.close()
            if row is None:
                print(
                    f"\nthe serving file {path} holds no feeds: no user got a post. Check the "
                    "user_feeds candidate window against the articles' publication times "
                    "(world_info.candidate_window_hours, user_feeds config "
                    "candidate_window_hours) and rerun"
                )
                return False
            user_id = int(row[0])
        feed = get_feed(user_id, path, limit=limit)
    except FeedNotPublishedError as exc:
        print(f"\n{exc}")
        return False
    if feed.is_empty():
        print(f"\nuser {user_id} has no feed in {path}; try `feed-dagster feed` with another user")
        return False
    print(f"\nfeed of user {user_id} (first {limit} of the served posts) from {path}")
    print(format_feed(feed))
    print(f"\nmore: feed-dagster feed {user_id}   |   duckdb -readonly {path}")
    return True


def format_feed(feed: pl.DataFrame) -> str:
    # The weighted score orders the feed but, with the reference weights, mostly sits in a
    # narrow band (negative totals are squashed below the offset): the click probability
    # next to it is what a reader can interpret.
    cols = [
        c
        for c in ("position", "source", "score", "p_click", "title", "author_handle", "reason")
        if c in feed.columns
    ]
    if "p_click" in feed.columns:
        feed = feed.with_columns(pl.col("p_click").round(3))
    with pl.Config(
        tbl_rows=100,
        tbl_width_chars=160,
        fmt_str_lengths=48,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
    ):
        return str(feed.select(cols))


REFUSED = (
    "run finished, but the publish was refused (publish_guard, above): readers still get "
    "the previous generation, if any. Fix the cause, or publish an intended shrink with "
    "published_feeds config allow_shrink: true"
)


def cmd_run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    store = storage()
    problem = instance_problem() or engine_problem()
    if problem:
        print(f"feed-dagster run: {problem}", file=sys.stderr)
        return 1
    # Quiet: Dagster's console logger shows errors only, like the rest of the output.
    log_level = args.log_level or ("ERROR" if args.quiet else "WARNING")
    with make_progress(args.quiet) as progress:
        try:
            refused = materialize_everything(log_level, progress=progress, root=store.data_root())
        except BuildFailed as exc:
            progress.error(
                f"{exc}\n\nrun stopped: a step failed (above); earlier outputs are intact"
            )
            return 1
    if args.quiet:
        # Only the outcome: the sample feed's notes matter only when there is no feed.
        with contextlib.redirect_stdout(io.StringIO()) as notes:
            shown = print_sample_feed(store.serving_path())
        if refused:
            print(REFUSED, file=sys.stderr)
            return 1
        if not shown:
            print(f"{notes.getvalue().strip()}\nrun finished without a feed", file=sys.stderr)
            return 1
        print(f"run finished in {time.perf_counter() - t0:.1f}s; feeds in {store.serving_path()}")
        return 0
    print_warehouse_summary(store.warehouse_path())
    shown = print_sample_feed(store.serving_path())
    if refused:
        print(f"\n{REFUSED}")
        return 1
    if not shown:
        print("\nrun finished without a feed to show (above)")
        return 1
    print(f"\nfeed-dagster run finished in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_make_ebnerd(args: argparse.Namespace) -> int:
    from feed_dagster.ebnerd import (
        article_first_seen,
        write_articles_for_ids,
        write_synthetic_ebnerd,
    )

    if args.articles_for:
        folder = Path(args.articles_for)
        behaviors = pl.read_parquet(folder / "behaviors.parquet")
        history = pl.read_parquet(folder / "history.parquet")
        seen = article_first_seen(behaviors, history)
        out = write_articles_for_ids(
            seen["article_id"], folder / "articles.parquet", seed=args.seed, first_seen=seen
        )
        print(f"wrote {out} ({seen.height:,} articles, exact EBNeRD articles schema)")
        return 0
    if not args.out:
        print("make-ebnerd: give --out DIR (or --articles-for DIR)", file=sys.stderr)
        return 2
    out = write_synthetic_ebnerd(
        args.out,
        users=args.users,
        articles=args.articles,
        impressions_per_user=args.impressions_per_user,
        seed=args.seed,
        with_test=args.with_test,
    )
    print(f"wrote a synthetic EBNeRD folder to {out}")
    print(f"use it with: FEED_DAGSTER_SOURCE=ebnerd:{out} make run")
    return 0


def cmd_feed(args: argparse.Namespace) -> int:
    import json

    from feed_dagster.serving.read import FeedNotPublishedError, get_feed

    path = Path(args.path) if args.path else storage().serving_path()
    try:
        feed = get_feed(args.user_id, path, limit=args.limit)
    except FeedNotPublishedError as exc:
        print(f"feed-dagster feed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(feed.to_dicts(), default=str, indent=1))
    elif feed.is_empty():
        print(f"user {args.user_id} has no feed in {path}")
        return 1
    else:
        print(format_feed(feed))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP service (feed_dagster/serving/http.py) under uvicorn."""
    import uvicorn

    from feed_dagster.serving.http import ENV_MEMORY, ENV_PATH, ENV_STALE

    path = Path(args.path).resolve() if args.path else storage().serving_path()
    # Every worker process builds its own app (and its own FeedReader) through the
    # factory, which reads its configuration from the environment it inherits.
    os.environ[ENV_PATH] = str(path)
    os.environ[ENV_STALE] = str(args.stale_after_hours * 3600)
    os.environ[ENV_MEMORY] = args.memory_limit
    print(f"serving {path} on http://{args.host}:{args.port}/ ({args.workers} worker(s))")
    uvicorn.run(
        "feed_dagster.serving.http:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        # One log line per request costs a worker about a fifth of its throughput.
        access_log=args.access_log,
        log_level="info" if args.access_log else "warning",
    )
    return 0


def cmd_fetch_serving(args: argparse.Namespace) -> int:
    """Copy the bucket's current serving generation to a local serving file."""
    from feed_dagster.serving.bucket import (
        GenerationCorruptError,
        GenerationNotFoundError,
        fetch_current,
    )

    store = storage()
    bucket = store.serving_bucket()
    if bucket is None:
        print(
            f"feed-dagster fetch-serving: {ARTIFACTS_URI_VARIABLE} does not name a bucket "
            "(s3://...); the serving file is only local",
            file=sys.stderr,
        )
        return 1
    target = Path(args.path).resolve() if args.path else store.serving_path()
    try:
        current = fetch_current(bucket, target)
    except (GenerationNotFoundError, GenerationCorruptError) as exc:
        print(f"feed-dagster fetch-serving: {exc}", file=sys.stderr)
        return 1
    print(f"generation {current.generation_id} ({current.bytes:,} bytes) in {target}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from feed_dagster.atomic import atomic_path
    from feed_dagster.data.warehouse import read_tables
    from feed_dagster.world.simulate import simulate_activity

    store = storage()
    tables = read_tables(store.warehouse_path(), ["articles", "engagements", "world_info"])
    now = tables["world_info"]["now"][0]
    posts, engagements = simulate_activity(
        tables["articles"], tables["engagements"], now, hours=args.hours, seed=args.seed
    )
    folder = store.incoming_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{now:%Y%m%dT%H%M%S}-{args.seed}"
    for name, df in (("articles", posts), ("engagements", engagements)):
        final = folder / f"{name}-{stamp}.parquet"
        # The temporary name does not end in .parquet, so the sensor ignores it.
        with atomic_path(final) as tmp:
            df.write_parquet(tmp)
        print(f"wrote {final} ({df.height:,} rows)")
    print("with `make ui` running, the incoming_batches sensor ingests them and refreshes feeds")
    return 0


# Every variable the command and the code it runs read, with its default.
ENVIRONMENT = {
    "FEED_DAGSTER_DATA": "storage root: warehouse, embeddings, models, vectors, shard files, "
    "serving file, incoming batches (default: ./data)",
    MODELS_URI_VARIABLE: "the model store's root, a local path or s3://bucket/prefix (endpoint "
    "and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) "
    "(default: models/ under the storage root)",
    ARTIFACTS_URI_VARIABLE: "the root of the vector table, the shard files and the article "
    "embeddings, a local path or s3://bucket/prefix (endpoint and credentials as for the "
    "model store; on a bucket, the warehouse tables too, as Parquet, and a copy of each "
    "published serving generation) (default: the storage root)",
    "FEED_DAGSTER_SOURCE": "where the tables come from: synthetic[:scale] (tiny, demo, ...), "
    "ebnerd:DIR (a folder or the official zip) or parquet:DIR (default: synthetic:demo)",
    "DAGSTER_HOME": "Dagster instance folder; set, runs of `run` are kept and show in the UI "
    "(the Makefile sets .dagster_home: SQLite files in that folder; deploy/postgres: run "
    "storage in PostgreSQL); unset, they are kept in memory only",
    POSTGRES_URL_VARIABLE: "the PostgreSQL database of the run, event log and schedule "
    f"storage when DAGSTER_HOME is deploy/postgres: {POSTGRES_URL_FORM} (the database must "
    "exist; Dagster creates its tables)",
    EXECUTOR_VARIABLE: "executor of jobs started from the UI, schedules and sensors: "
    "multiprocess (one process per step, forked from a server that imported the project), "
    "spawn (one freshly started process per step), in_process or celery (steps on Celery "
    "workers) (default: multiprocess); with celery, `run` also sends each user shard as a run of "
    "refresh_feeds to the workers; otherwise it runs its steps in its own process and its "
    "shards in worker processes",
    "FEED_DAGSTER_CELERY_BROKER": "with FEED_DAGSTER_EXECUTOR=celery, the Redis broker the "
    "workers listen on, e.g. redis://HOST:6379/0 (no default)",
    SHARD_RUNS_VARIABLE: "with FEED_DAGSTER_EXECUTOR=celery, how many shard runs `run` keeps "
    "in flight at once (default: the number of Celery workers that answer a ping)",
    "FEED_DAGSTER_SHARDS": "number of user shards of user_feeds (default: 4; 16 for "
    "synthetic:m, 64 for synthetic:l)",
    "FEED_DAGSTER_ENCODER": "article content encoder: lexical, minilm (needs the [text] "
    "extra) or precomputed (default: lexical)",
}
# Set by `serve` for its worker processes (from its options), read by the app factory.
SERVE_ENVIRONMENT = {
    "FEED_DAGSTER_SERVING_FILE": "the serving file (from --path)",
    "FEED_DAGSTER_STALE_AFTER_SECONDS": "from --stale-after-hours",
    "FEED_DAGSTER_READER_MEMORY": "from --memory-limit",
}


def _environment_help(variables: dict[str, str], title: str = "environment variables") -> str:
    lines = [f"{title}:"]
    for name, text in variables.items():
        lines.append(f"  {name}")
        lines += textwrap.wrap(text, 76, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and the environment list."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def build_parser() -> argparse.ArgumentParser:
    """The `feed-dagster` parser: every command, option, default and variable it reads."""
    env = _environment_help(ENVIRONMENT)
    parser = argparse.ArgumentParser(
        prog="feed-dagster",
        description=textwrap.fill(
            "Build the precomputed 'For You' feeds (a Dagster asset graph) and read them: "
            "`run` builds everything, `feed` prints one user's feed, `serve` answers over "
            "HTTP, `fetch-serving` copies the published feeds from the artifacts bucket, "
            "`simulate` and `make-ebnerd` write data to try it on.",
            88,
        ),
        epilog=f"{env}\n\n`feed-dagster COMMAND --help` describes a command.",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 88),
            epilog=env,
            formatter_class=_HelpFormatter,
        )

    run = command(
        "run",
        "materialise the whole asset graph and show what was built",
        "Materialise every asset: sources, models and vectors, then each user shard of "
        "user_feeds in worker processes (with FEED_DAGSTER_EXECUTOR=celery: one run per "
        "shard on the Celery workers), then the publish and the feed-quality evaluation. "
        "Shows each step with its elapsed time, training epochs and shard progress (a live "
        "display on a terminal, plain lines otherwise), then the warehouse's tables and "
        "one user's feed. Exit status 1 when the Dagster instance (DAGSTER_HOME) or the "
        "Celery broker cannot be used, a step failed, the publish was refused or there is no "
        "feed to show.",
    )
    run.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        type=str.upper,
        help="Dagster console log level (default: WARNING, or ERROR with --quiet); step "
        "log lines below it appear in the progress display",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="for scripts: no progress, warehouse summary or sample feed; errors on stderr "
        "and one final line on stdout (default: off)",
    )
    run.set_defaults(func=cmd_run)

    feed = command(
        "feed",
        "print one user's precomputed feed from the serving file",
        "Print USER_ID's feed from the live serving file as a table (position, source, "
        "score, title, author, reason), best first. Posts deleted and authors blocked or "
        "muted since the publish are left out. Exit status 1 when the user has no feed or "
        "nothing is published yet.",
    )
    feed.add_argument("user_id", type=int, help="the user whose feed to print")
    feed.add_argument(
        "--limit", type=int, default=35, help="at most this many posts (default: %(default)s)"
    )
    feed.add_argument(
        "--json", action="store_true", help="print all columns as JSON (default: a table)"
    )
    feed.add_argument(
        "--path",
        help="serving file to read (default: serving/feeds.duckdb under FEED_DAGSTER_DATA)",
    )
    feed.set_defaults(func=cmd_feed)

    serve = command(
        "serve",
        "HTTP service and page over the serving file",
        "Serve the precomputed feeds over HTTP with uvicorn: GET /v1/feeds/USER_ID "
        "(?limit=, ?cursor=), GET /v1/health and a page at / to read a user's feed. Each "
        "worker holds one read-only connection and follows publishes.",
    )
    serve.epilog = f"{env}\n\n{_environment_help(SERVE_ENVIRONMENT, 'set for the workers')}"
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8080, help="port to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--path",
        help="serving file to serve (default: serving/feeds.duckdb under FEED_DAGSTER_DATA)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes, each with its own reader (default: %(default)s)",
    )
    serve.add_argument(
        "--stale-after-hours",
        type=float,
        default=2.0,
        help="/v1/health reports 'stale' when the live generation is older than this "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--memory-limit",
        default="1GB",
        help="DuckDB buffer pool per worker; more keeps more of a large file decompressed "
        "(default: %(default)s)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    serve.set_defaults(func=cmd_serve)

    fetch = command(
        "fetch-serving",
        "copy the current serving generation from the artifacts bucket to a local file",
        "Download the serving generation the last publish put on the bucket "
        f"({ARTIFACTS_URI_VARIABLE}/serving/CURRENT names it), check its size and SHA-256, "
        "and swap it into the local serving file atomically, with its lookup file: for "
        "`feed` and `serve` on a machine other than the one that published. Nothing is "
        "downloaded when the file already holds that generation. Exit status 1 when the "
        "artifacts are not on a bucket, nothing is published there, or the copy is damaged.",
    )
    fetch.add_argument(
        "--path",
        help="serving file to write (default: serving/feeds.duckdb under FEED_DAGSTER_DATA)",
    )
    fetch.set_defaults(func=cmd_fetch_serving)

    sim = command(
        "simulate",
        "write the next hours of synthetic activity into the incoming folder",
        "Write the next HOURS of synthetic posts and engagements after the warehouse's "
        "`now` as Parquet batches into incoming/ under FEED_DAGSTER_DATA, where the "
        "incoming_batches sensor (with `make ui` running) ingests them and refreshes feeds. "
        "Needs a built warehouse (`run` first).",
    )
    sim.add_argument(
        "--hours", type=float, default=1.0, help="hours of activity to write (default: %(default)s)"
    )
    sim.add_argument(
        "--seed", type=int, default=0, help="random seed of the activity (default: %(default)s)"
    )
    sim.set_defaults(func=cmd_simulate)

    eb = command(
        "make-ebnerd",
        "write a synthetic EBNeRD folder (exact dtypes), or an articles file for real files",
        "Write a synthetic EBNeRD folder with the exact schema and dtypes of the real "
        "dataset (articles.parquet, train/, validation/, optionally test/), to use as "
        "FEED_DAGSTER_SOURCE=ebnerd:DIR; or, with --articles-for DIR, an articles.parquet "
        "for the article ids in real behaviors/history files.",
    )
    eb.add_argument("--out", help="folder to write (required unless --articles-for is given)")
    eb.add_argument(
        "--users", type=int, default=200, help="users to generate (default: %(default)s)"
    )
    eb.add_argument(
        "--articles", type=int, default=1500, help="articles to generate (default: %(default)s)"
    )
    eb.add_argument(
        "--impressions-per-user",
        type=int,
        default=10,
        help="impressions per user (default: %(default)s)",
    )
    eb.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    eb.add_argument(
        "--with-test", action="store_true", help="also write test/ (no labels) (default: off)"
    )
    eb.add_argument(
        "--articles-for",
        metavar="DIR",
        help="instead: write DIR/articles.parquet for the ids in DIR's behaviors/history files",
    )
    eb.set_defaults(func=cmd_make_ebnerd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
