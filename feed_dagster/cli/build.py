"""The build `feed-dagster run` makes: the asset graph in phases, each step a Dagster run.

Sources, then everything upstream of the feeds, each in a process of its own that ends
before the next starts (memory a phase freed goes back to the system); then the user
shards, in a pool of processes on this machine or as runs of refresh_feeds on the Celery
workers (FEED_DAGSTER_EXECUTOR=celery); then publish and feed quality. Each step's events
reach a Progress as they happen. Dagster is imported only when a step runs."""

from __future__ import annotations

import functools
import os
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feed_dagster.cli.instance import run_instance
from feed_dagster.paths import DataRoot, data_root
from feed_dagster.processes import die_with_parent
from feed_dagster.progress import PlainProgress, Progress


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


def _worker_init(events: Any, parent_pid: int) -> None:
    global _WORKER_EVENTS
    _WORKER_EVENTS = events
    die_with_parent(parent_pid)


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
    instance = run_instance()
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
    """Materialise the whole asset graph under the storage root `root` (default:
    FEED_DAGSTER_DATA's): everything upstream of the feeds, then every user shard of
    user_feeds (shards in parallel worker processes, as an executor would fan them out),
    then the publish, then the feed-quality evaluation. `progress` shows each phase, step,
    shard and step log line as it happens (default: plain lines on stdout).

    Returns None, or the report of a publish the guard refused (the build goes on: the
    live generation stays served and feed quality is still measured)."""
    # The partitions user_feeds is defined with, without importing the assets (and torch
    # with them) into this process, which waits beside the phases for their whole length.
    from feed_dagster.feeds.shards import shard_keys

    own = progress is None
    progress = progress or PlainProgress()
    root = root or DataRoot(data_root()).data_root()
    try:
        return _materialize_phases(log_level, workers, progress, shard_keys(), root)
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
        initargs=(events, os.getpid()),
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
        with ProcessPoolExecutor(
            at_once,
            mp_context=get_context("spawn"),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
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
