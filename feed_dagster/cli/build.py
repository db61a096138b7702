"""The build `feed-dagster run` makes: the asset graph in phases, each step a Dagster run.

Sources, then everything upstream of the feeds, each in a process of its own that ends
before the next starts (memory a phase freed goes back to the system); then the user
shards, in a pool of processes on this machine or as runs of refresh_feeds on the Celery
workers (FEED_DAGSTER_EXECUTOR=celery); then publish and feed quality. Each step's events
reach a Progress as they happen. Running the steps is feed_dagster/jobs/step_runs.py's part;
it is imported only when a step runs, so the commands that only read feeds start quickly."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feed_dagster.jobs.outcomes import BuildFailed, PublishRefused, StepEvent, dispatch
from feed_dagster.paths import DataRoot, data_root
from feed_dagster.processes import die_with_parent
from feed_dagster.progress import PlainProgress, Progress

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
    returns its report lines (see step_runs.execute_step for `which`). `emit` receives the
    steps' progress (in a worker process: the queue the pool was started with). Raises
    BuildFailed(report) when anything fails."""
    from feed_dagster.definitions import build_definitions
    from feed_dagster.jobs.step_runs import execute_step
    from feed_dagster.resources.storage import StorageResource

    if emit is None and _WORKER_EVENTS is not None:
        emit = _WORKER_EVENTS.put
    defs = build_definitions(StorageResource(root=str(root)))
    return execute_step(defs, label, which, partition_key, log_level, emit)


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
            emit = functools.partial(dispatch, progress)
            report = _run_step(label, which, None, log_level, root, emit)
        progress.phase_finished(label, report)
        return report

    # The heavy phases run in processes of their own (see _in_fresh_processes); publish and
    # feed quality run here, after them, where a process start would only add time.
    phase("sources", "sources", "generate or load the world, check its tables", fresh=True)
    phase("models and vectors", "derived", "training takes a few minutes", fresh=True)
    phase(
        "serving inputs", "serving", "what every shard shares: catalog, counts, peers", fresh=True
    )
    if shard_engine():
        # Each shard one run of refresh_feeds, as the schedule and the sensor start them.
        runs = workers or shard_runs_at_once(len(shards))
        progress.shards_started(len(shards), runs, "runs at a time on the Celery workers")
        from feed_dagster.jobs.step_runs import shards_on_engine

        shards_on_engine(log_level, progress, root, shards, runs)
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
                dispatch(progress, events.get(timeout=timeout))
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
