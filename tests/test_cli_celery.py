"""`feed-dagster run` with FEED_DAGSTER_EXECUTOR=celery sends each user_feeds shard, as one run
of refresh_feeds, to the Celery workers (a real Redis from tests/servers.py, workers started by
`dagster-celery worker start`); without an engine its shards stay in its own processes."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from celery_helpers import ROOT, celery_workers, shared_instance, worker_env, worker_of_step
from servers import free_port

import feed_dagster.cli as cli
import feed_dagster.cli.build as run_build
import feed_dagster.jobs.step_runs as step_runs
from feed_dagster.jobs.executors import CELERY_BROKER_VARIABLE, EXECUTOR_VARIABLE
from feed_dagster.progress import PlainProgress
from feed_dagster.serving.read import connect


def _record_phases(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], int]]:
    """Replace the ways `run` builds with recorders: (how, shards or phases, runs at once)."""
    calls: list[tuple[str, list[str], int]] = []

    def pool(log_level, progress, root, tasks, workers, on_finished=None):
        calls.append(("pool", [key or which for _, which, key in tasks], workers))
        return [f"- {label}: built" for label, _, _ in tasks]

    def engine(log_level, progress, root, shards, at_once):
        calls.append(("engine", list(shards), at_once))
        return [f"- user_feeds shard {key}: built" for key in shards]

    monkeypatch.setattr(run_build, "_in_fresh_processes", pool)
    monkeypatch.setattr(step_runs, "shards_on_engine", engine)
    monkeypatch.setattr(run_build, "_run_step", lambda label, *args: f"- {label}: built")
    return calls


@pytest.mark.parametrize("executor", [None, "multiprocess", "in_process"])
def test_without_the_celery_engine_shards_run_in_runs_own_processes(
    executor, monkeypatch, tmp_path
) -> None:
    if executor is None:
        monkeypatch.delenv(EXECUTOR_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(EXECUTOR_VARIABLE, executor)
    calls = _record_phases(monkeypatch)
    out = io.StringIO()
    with PlainProgress(out, heartbeat=0) as progress:
        run_build._materialize_phases("WARNING", 2, progress, ["0", "1"], tmp_path)
    assert run_build.shard_engine() is None and cli.engine_problem() is None
    assert cli.EXECUTOR_VARIABLE == EXECUTOR_VARIABLE  # named twice: the CLI reads it early
    assert calls == [
        ("pool", ["sources"], 1),
        ("pool", ["derived"], 1),
        ("pool", ["serving"], 1),
        ("pool", ["0", "1"], 2),
    ]
    assert "- user_feeds: 2 shards on 2 worker processes ..." in out.getvalue()


def test_with_celery_the_shards_go_to_the_engine_as_many_at_once_as_asked(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv(EXECUTOR_VARIABLE, "celery")
    monkeypatch.setenv(cli.SHARD_RUNS_VARIABLE, "8")
    calls = _record_phases(monkeypatch)
    out = io.StringIO()
    with PlainProgress(out, heartbeat=0) as progress:
        run_build._materialize_phases("WARNING", None, progress, ["0", "1", "2"], tmp_path)
    # The phases before the shards still build here; the shards, at most one run each.
    assert calls == [
        ("pool", ["sources"], 1),
        ("pool", ["derived"], 1),
        ("pool", ["serving"], 1),
        ("engine", ["0", "1", "2"], 3),
    ]
    assert "3 shards on 3 runs at a time on the Celery workers" in out.getvalue()


def test_the_engine_settings_are_named_before_anything_is_built(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(EXECUTOR_VARIABLE, "celery")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert "DAGSTER_HOME" in cli.engine_problem()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.delenv(CELERY_BROKER_VARIABLE, raising=False)
    assert CELERY_BROKER_VARIABLE in cli.engine_problem()
    monkeypatch.setenv(CELERY_BROKER_VARIABLE, f"redis://127.0.0.1:{free_port()}/0")
    problem = cli.engine_problem()
    assert "cannot be reached" in problem and EXECUTOR_VARIABLE in problem


@pytest.mark.slow
def test_run_sends_each_shard_to_a_celery_worker(data_dir, tmp_path, monkeypatch, redis_url):
    monkeypatch.setenv("FEED_DAGSTER_SHARDS", "2")
    home = shared_instance(tmp_path / "dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = worker_env(home, redis_url)
    logs = tmp_path / "logs"
    logs.mkdir()
    names = ["cli-shard-a", "cli-shard-b"]
    output = logs / "run.log"
    with celery_workers(names, env, logs) as worker_pids, output.open("w") as sink:
        run = subprocess.Popen(
            [sys.executable, "-m", "feed_dagster.cli", "run"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        try:
            run.wait(timeout=240)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
            pytest.fail(f"`feed-dagster run` still running after 240 s:\n{output.read_text()}")
    out = output.read_text()
    assert run.returncode == 0, out
    # The progress names each shard, its step's time (read back from the run's events, which
    # the workers wrote) and the count, as the local pool's does.
    assert "- user_feeds: 2 shards on 2 runs at a time on the Celery workers ..." in out
    for key in ("0", "1"):
        assert f"- user_feeds shard {key}: built user_feeds in" in out
        assert f"user_feeds shard {key} done in" in out
    assert "2/2 shards done" in out and "- publish: built published_feeds" in out

    instance = dg.DagsterInstance.get()
    try:
        shard_runs = instance.get_runs(filters=dg.RunsFilter(job_name=step_runs.SHARD_JOB))
        assert sorted(r.tags[step_runs.PARTITION_TAG] for r in shard_runs) == ["0", "1"]
        assert {r.status for r in shard_runs} == {dg.DagsterRunStatus.SUCCESS}
        for shard_run in shard_runs:
            # Each shard's step ran in a worker's process, not in `run`'s (nor in this one).
            worker = worker_of_step(instance, shard_run.run_id, "user_feeds", worker_pids)
            assert worker_pids[worker] not in {run.pid, os.getpid()}
    finally:
        instance.dispose()

    # The serving file published after the shards holds every user's feed.
    data = Path(os.environ["FEED_DAGSTER_DATA"])
    with duckdb.connect(str(data / "warehouse.duckdb"), read_only=True) as con:
        users = {u for (u,) in con.execute("select user_id from main.users").fetchall()}
    with contextlib.closing(connect(data / "serving" / "feeds.duckdb")) as con:
        served = {u for (u,) in con.execute("select user_id from serving.feed_users").fetchall()}
    assert users and served == users


class _FailedRun:
    """What Dagster returns for a run that failed before any step ran (an executor that
    could not start): no step failure, only the run's."""

    run_id = "r1"
    success = False

    def __init__(self) -> None:
        error = dg.DagsterEvent(
            event_type_value="PIPELINE_FAILURE",
            job_name=step_runs.SHARD_JOB,
            message="run failed",
            event_specific_data=None,
        )
        self.all_events = [error]

    def get_asset_materialization_events(self) -> list:
        return []

    def get_asset_check_evaluations(self) -> list:
        return []

    def get_step_failure_events(self) -> list:
        return []


def test_a_shard_run_that_failed_before_its_step_stops_the_build() -> None:
    with pytest.raises(cli.BuildFailed) as caught:
        step_runs.step_report("user_feeds shard 0", 1.0, _FailedRun())
    assert "FAILED run r1: run failed" in str(caught.value)
