"""Running the steps of `feed-dagster run` as Dagster runs, and reporting on them.

Each phase of the build is one in-process run of an ephemeral asset job over the assets of
a Definitions the caller builds; a user shard on the Celery engine is one run of
refresh_feeds, started with the job's own executor. A run's events become StepEvents as
they happen, for the CLI's progress display; its outcome becomes report lines, or
BuildFailed / PublishRefused."""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository

from feed_dagster.jobs.instance import run_instance
from feed_dagster.jobs.outcomes import (
    BuildFailed,
    PublishRefused,
    StepEvent,
    dispatch,
    error_text,
)
from feed_dagster.processes import die_with_parent
from feed_dagster.progress import Progress

# The name `dg.materialize` gives its job: runs of `run` look the same in the UI's history.
EPHEMERAL_JOB = "__ephemeral_asset_job__"


def step_listener(
    phase: str, emit: Callable[[StepEvent], None], log_level: str
) -> Callable[[Any], None]:
    """An instance event listener that turns a run's events into StepEvents (also fed the
    entries of a run's event log as they are read back).

    Log lines of steps at INFO up to (not including) the console's `log_level` are passed
    on: those at or above it the Dagster console logger prints already."""
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


def execute_step(
    defs: dg.Definitions,
    label: str,
    which: str,
    partition_key: str | None,
    log_level: str,
    emit: Callable[[StepEvent], None] | None = None,
) -> str:
    """Materialise one step of `run` from `defs` in this process; returns its report lines.

    `which`: "sources" (the source's tables), "derived" (the rest upstream of the feeds but
    serving_inputs), "serving" (serving_inputs: what the shards share), "shard" (one
    user_feeds partition), "publish" or "quality" (feed_quality). `emit`
    receives the steps' progress. Raises BuildFailed(report) when anything fails.
    """
    # Here, not at the top: the parent of `run` follows engine runs through this module
    # without importing the assets (and torch with them).
    from feed_dagster.jobs.automation import (
        DERIVED_UPSTREAM,
        FEED_QUALITY,
        FEEDS,
        SERVING_INPUTS,
        SOURCE_TABLES,
    )

    selection = {
        "sources": SOURCE_TABLES,
        "derived": DERIVED_UPSTREAM,
        "serving": SERVING_INPUTS,
        "shard": FEEDS,
        "publish": dg.AssetSelection.assets("published_feeds"),
        "quality": FEED_QUALITY,
    }[which]
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
        instance.add_event_listener(run_id, step_listener(label, emit, log_level))
    result = job.execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        instance=instance,
        partition_key=partition_key,
        raise_on_error=False,
        run_id=run_id,
    )
    return step_report(label, time.perf_counter() - t0, result)


def step_report(label: str, seconds: float, result: Any) -> str:
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
        lines.append(f"  FAILED run {result.run_id}: {run_failure_text(result)}")
    if fatal:
        raise BuildFailed("\n".join(lines))
    return "\n".join(lines)


def run_failure_text(result: Any) -> str:
    """Why a run failed when no step says so: its RUN_FAILURE event's error."""
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.RUN_FAILURE:
            data = event.event_specific_data
            error = getattr(data, "error", None)
            return error_text(error) if error is not None else event.message or "run failed"
    return "the run failed without a step failure"


# Tags of the shard runs `run` starts on the engine: the partition (what the schedule's
# runs carry) and the build they belong to, by which their events are found and followed.
PARTITION_TAG = "dagster/partition"
BUILD_TAG = "feed_dagster/build"
SHARD_JOB = "refresh_feeds"


def shards_on_engine(
    log_level: str, progress: Progress, root: Path, shards: list[str], at_once: int
) -> list[str]:
    """Each shard as one run of the refresh_feeds job of feed_dagster.definitions, through
    Dagster's own execution with the job's executor (the Celery workers take the steps, as
    for the UI's and the schedule's runs), at most `at_once` runs at a time; returns the
    reports in shard order.

    Each run is started from a spawned process of its own (`shard_run`), reused for the
    next shard: Dagster configures Python's logging as a run starts, which can deadlock
    against another run's logging in the same process. The steps' events are written by the
    workers, never passing through a process of `run`, so progress comes from reading each
    run's event log back here as it grows."""
    build = str(uuid.uuid4())
    emit = functools.partial(dispatch, progress)
    followed: dict[str, tuple[Callable[[Any], None], Any]] = {}
    done: set[str] = set()
    reports: dict[str, str] = {}
    with dg.DagsterInstance.get() as instance:

        def follow(only: str | None = None) -> None:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={BUILD_TAG: build}))
            for run in runs:
                if run.run_id not in followed and run.run_id not in done:
                    label = f"user_feeds shard {run.tags[PARTITION_TAG]}"
                    followed[run.run_id] = (step_listener(label, emit, log_level), None)
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
            pending = {pool.submit(shard_run, key, build, log_level, root): key for key in shards}
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


def shard_run(key: str, build: str, log_level: str, root: Path) -> tuple[str, str]:
    """Run shard `key` as a run of refresh_feeds with the job's own executor, tagged with
    the partition and the build; returns (run id, report). Raises BuildFailed(report) when
    the run failed."""

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
    return result.run_id, step_report(label, time.perf_counter() - t0, result)
