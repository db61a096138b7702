"""The tiny world end to end on real servers, as on a cluster: runs kept in PostgreSQL and
queued by the QueuedRunCoordinator, launched by the Dagster daemon, every step on one of two
Celery workers (Redis broker), the models and every artifact on an S3-compatible bucket
(moto), and no local directory shared by the machines.

The processes stand for machines: this test and the daemon (with the run processes it
launches) share one storage root, FEED_DAGSTER_DATA, which must stay empty; each worker has
a storage root of its own, its machine's local disk, which may hold only what stays local
by design (the serving file of the publishing machine, the evaluation tables, the cached
peer scores). A shard built on one worker reaches the publish on another only through the
bucket."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from celery_workers import BIN, ROOT, celery_steps, celery_workers, children, stop_session
from servers import PostgresServer, S3Server

from feed_dagster.artifacts import read_parquet
from feed_dagster.cli import POSTGRES_URL_VARIABLE
from feed_dagster.jobs.executors import CELERY_BROKER_VARIABLE, EXECUTOR_VARIABLE
from feed_dagster.paths import ARTIFACTS_URI_VARIABLE, MODELS_URI_VARIABLE
from feed_dagster.serving.bucket import current_generation, fetch_current

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKSPACE = ROOT / "workspace.yaml"
WORKERS = ["feed-e2e-a", "feed-e2e-b"]
SHARDS = ("0", "1")
# Per phase; the models' training dominates (about a minute on two busy cores).
RUN_TIMEOUT = 360
# A smaller sample of the tiny world to train and evaluate on: the test is about where
# things run and are kept, not about the models' quality.
SMALL_BUDGET = {
    "ops": {
        "trained_models": {
            "config": {
                "train_slates": 300,
                "valid_slates": 60,
                "heldout_users": 40,
                "retrieval_positives": 3000,
            }
        }
    }
}


def dagster_home(folder: Path) -> Path:
    """deploy/postgres/dagster.yaml, as shipped, with the run queue: runs submitted wait as
    QUEUED until the daemon launches them."""
    config = yaml.safe_load((ROOT / "deploy" / "postgres" / "dagster.yaml").read_text())
    config["run_coordinator"] = {
        "module": "dagster.core.run_coordinator",
        "class": "QueuedRunCoordinator",
        "config": {"dequeue_interval_seconds": 1},
    }
    folder.mkdir()
    (folder / "dagster.yaml").write_text(yaml.safe_dump(config))
    return folder


@contextlib.contextmanager
def dagster_daemon(env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`dagster-daemon run` on the project's workspace, in a session of its own, until the
    block ends; it and the run processes it launched are stopped then."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(WORKSPACE)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_session(proc)


@contextlib.contextmanager
def code_location(instance: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(workspace, code location, repository) of workspace.yaml, loaded as the `dagster`
    command loads it (a code server process in this test's environment)."""
    from dagster import __version__
    from dagster._cli.workspace.cli_target import (
        WorkspaceOpts,
        get_code_location_from_workspace,
        get_remote_repository_from_code_location,
        get_workspace_from_cli_opts,
    )

    opts = WorkspaceOpts(workspace=[str(WORKSPACE)])
    with get_workspace_from_cli_opts(instance, __version__, opts) as workspace:
        location = get_code_location_from_workspace(workspace, "feed_dagster")
        yield workspace, location, get_remote_repository_from_code_location(location, None)


def stop_instigators(instance: Any, repo: Any) -> list[str]:
    """Stop every sensor and schedule of `repo` (most run by default), before the daemon
    starts; returns their names."""
    stopped = []
    for sensor in repo.get_sensors():
        instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
        stopped.append(sensor.name)
    for schedule in repo.get_schedules():
        instance.stop_schedule(schedule.get_remote_origin_id(), schedule.selector_id, schedule)
        stopped.append(schedule.name)
    return stopped


def submit(
    instance: Any,
    workspace: Any,
    location: Any,
    repo: Any,
    job: str,
    run_config: Mapping[str, Any],
    tags: Mapping[str, str],
) -> Any:
    """Create a run of `job` and submit it, as `dagster job launch` and the UI's launch
    button do: the instance's run coordinator decides what happens next."""
    from dagster._cli.job import _create_run

    run = _create_run(
        instance=instance,
        code_location=location,
        remote_repo=repo,
        remote_job=repo.get_full_job(job),
        run_config=run_config,
        tags=tags,
        op_selection=None,
        run_id=None,
    )
    return instance.submit_run(run.run_id, workspace)


def wait_for(instance: Any, run_ids: list[str], logs: Path, daemon_pid: int) -> dict[str, int]:
    """Until every run has finished; fails with the failed steps' errors and the logs.
    Returns {run id: pid of its run process} for the runs whose process was seen running
    as a descendant of the daemon (the process that writes the run's RUN_START event)."""
    import dagster as dg

    finished = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE}
    finished |= {dg.DagsterRunStatus.CANCELED}
    deadline = time.monotonic() + RUN_TIMEOUT
    launched: dict[str, int] = {}
    while True:
        runs = [instance.get_run_by_id(r) for r in run_ids]
        for run in runs:
            if run.run_id in launched or run.status != dg.DagsterRunStatus.STARTED:
                continue
            starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START)
            if starts and starts[0].dagster_event.pid in children(daemon_pid):
                launched[run.run_id] = starts[0].dagster_event.pid
        if all(r.status in finished for r in runs):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"runs not finished in {RUN_TIMEOUT} s: {_story(instance, runs, logs)}")
        time.sleep(0.3)
    failed = [r for r in runs if r.status != dg.DagsterRunStatus.SUCCESS]
    assert not failed, _story(instance, failed, logs)
    return launched


def _story(instance: Any, runs: list[Any], logs: Path) -> str:
    lines = []
    for run in runs:
        lines.append(f"run {run.run_id} of {run.job_name}: {run.status}")
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if (event is not None and event.is_failure) or entry.level >= 40:
                lines.append(f"  {entry.user_message}")
    for log in sorted(logs.glob("*.log")):
        lines.append(f"--- {log.name} (last 3000 characters)\n{log.read_text()[-3000:]}")
    return "\n".join(lines)


def _keys(server: S3Server, bucket: str, prefix: str) -> list[str]:
    client, keys, token = server.client(), [], None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **extra)
        keys += [o["Key"].removeprefix(prefix) for o in listed.get("Contents", [])]
        if not listed.get("IsTruncated"):
            return sorted(keys)
        token = listed["NextContinuationToken"]


def _feed_rows(path: Path) -> Any:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT * FROM feeds ORDER BY user_id, position").pl()
    finally:
        con.close()


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """`path` closed to writes while the block runs: its mode, and for root, whom modes do
    not stop, the immutable attribute (chattr +i). Proven by a write that must fail."""
    path.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        with pytest.raises(OSError):
            (path / "probe").write_text("x")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_the_tiny_world_runs_queued_on_celery_workers_with_everything_on_the_bucket(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_server: PostgresServer,
    postgres_database: str,
    s3_server: S3Server,
    s3_bucket: str,
    redis_url: str,
    request: pytest.FixtureRequest,
) -> None:
    import dagster as dg

    if not (BIN / "dagster-daemon").exists():
        pytest.skip(f"dagster-daemon is not installed beside {BIN / 'python'}")
    started = time.monotonic()
    logs = tmp_path / "logs"
    logs.mkdir()
    shared = tmp_path / "shared-data"
    shared.mkdir()
    disks = {name: tmp_path / f"{name}-disk" for name in WORKERS}
    artifacts = f"s3://{s3_bucket}/artifacts"
    # What every machine is given: the instance, the source, the executor, the buckets
    # (the AWS_* variables of s3_bucket are in os.environ) and the storage root.
    settings = {
        "DAGSTER_HOME": str(dagster_home(tmp_path / "dagster_home")),
        POSTGRES_URL_VARIABLE: postgres_server.url(postgres_database, "postgresql+psycopg2"),
        "FEED_DAGSTER_DATA": str(shared),
        "FEED_DAGSTER_SOURCE": "synthetic:tiny",
        "FEED_DAGSTER_SHARDS": str(len(SHARDS)),
        EXECUTOR_VARIABLE: "celery",
        CELERY_BROKER_VARIABLE: redis_url,
        MODELS_URI_VARIABLE: f"s3://{s3_bucket}/models",
        ARTIFACTS_URI_VARIABLE: artifacts,
        "PYTHONPATH": str(ROOT),
        # dagster-celery starts the `celery` command found on PATH.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    env = dict(os.environ)
    # Each worker's machine has its own local disk.
    own = {name: {"FEED_DAGSTER_DATA": str(disk)} for name, disk in disks.items()}

    timings: list[str] = []
    launched: dict[str, int] = {}
    instance = dg.DagsterInstance.get()  # creates Dagster's tables before anyone else
    request.addfinalizer(instance.dispose)
    with (
        unwritable(shared),
        celery_workers(WORKERS, env, logs, own_env=own) as worker_pids,
        code_location(instance) as (workspace, location, repo),
    ):
        assert len(stop_instigators(instance, repo)) >= 5
        with dagster_daemon(env, logs / "daemon.log") as daemon:
            # Sources, models and vectors (with their checks); then both shards at once;
            # then the publish: the runs the refresh chain starts, in its order.
            phases: list[list[Any]] = []
            for batch in (
                [("full_rebuild", SMALL_BUDGET, {})],
                [("refresh_feeds", {}, {"dagster/partition": key}) for key in SHARDS],
                [("publish_feeds", {}, {})],
            ):
                phase_started = time.monotonic()
                submitted = [
                    submit(instance, workspace, location, repo, job, config, tags)
                    for job, config, tags in batch
                ]
                # The queue holds them until the daemon takes them.
                assert {r.status for r in submitted} == {dg.DagsterRunStatus.QUEUED}
                ids = [r.run_id for r in submitted]
                launched |= wait_for(instance, ids, logs, daemon.pid)
                phases.append(submitted)
                timings.append(f"{batch[0][0]} {time.monotonic() - phase_started:.0f} s")
    elapsed = time.monotonic() - started

    # --- the runs went through the queue and the daemon launched them ----------------------
    runs = [r for phase in phases for r in phase]
    for run in runs:
        events = [e.dagster_event for e in instance.all_logs(run.run_id) if e.dagster_event]
        kinds = [e.event_type for e in events]
        order = [dg.DagsterEventType.RUN_ENQUEUED, dg.DagsterEventType.RUN_STARTING]
        order.append(dg.DagsterEventType.RUN_START)
        assert [kinds.index(kind) for kind in order] == sorted(kinds.index(k) for k in order)
        # The run's process was started by the daemon (a descendant of its process: the
        # daemon's code server launches it), never by this test, which only submitted it.
        assert run.run_id in launched and launched[run.run_id] != os.getpid(), run.job_name
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.SUCCESS

    # --- every step ran in a Celery worker's process ---------------------------------------
    steps = {run.run_id: celery_steps(instance, run.run_id) for run in runs}
    for run in runs:
        assert steps[run.run_id], f"no step of {run.job_name} succeeded"
        for step in steps[run.run_id].values():
            assert step.worker in WORKERS, step
            assert step.pid == worker_pids[step.worker], step
    rebuild_steps = set(steps[phases[0][0].run_id])
    assert {"source_tables", "trained_models", "article_vectors"} <= rebuild_steps
    shard_steps = [steps[r.run_id]["user_feeds"] for r in phases[1]]
    assert all(step.worker in WORKERS for step in shard_steps)
    (publish_step,) = steps[phases[2][0].run_id].values()
    assert publish_step.step_key == "published_feeds"

    # --- the models and every artifact are on the bucket ------------------------------------
    models = _keys(s3_server, s3_bucket, "models/")
    for name in ("two_tower", "ranker"):
        assert f"{name}/PROMOTED" in models
        assert any(k.startswith(f"{name}/") and k.endswith("model.safetensors") for k in models)
    stored = _keys(s3_server, s3_bucket, "artifacts/")
    tables = {k.removeprefix("warehouse/") for k in stored if k.startswith("warehouse/")}
    assert {"users.parquet", "articles.parquet", "engagements.parquet", "follows.parquet"} <= tables
    assert any(k.startswith("lancedb/") for k in stored)
    assert {f"feeds/shards/shard-{key}.parquet" for key in SHARDS} <= set(stored)
    assert "embeddings/article_embeddings.parquet" in stored
    publish = instance.get_latest_materialization_event(dg.AssetKey("published_feeds"))
    assert publish is not None and publish.asset_materialization is not None
    generation = publish.asset_materialization.metadata["generation_id"].value
    assert current_generation(f"{artifacts}/serving").generation_id == generation
    assert f"serving/generations/{generation}.duckdb" in stored

    # --- nothing was written to the shared storage root ------------------------------------
    assert _files(shared) == [] and list(shared.iterdir()) == []
    # A worker's own disk holds only what stays local by design: no warehouse, vectors,
    # shards or embeddings. The serving file is on the publishing worker's disk alone.
    for name, disk in disks.items():
        files = _files(disk) if disk.exists() else []
        for path in files:
            assert path.startswith(("serving/", "models/evaluations/", "models/serving_peers/"))
        assert ("serving/feeds.duckdb" in files) == (name == publish_step.worker), (name, files)

    # --- a reader on another machine fetches the same feeds ---------------------------------
    fetched = fetch_current(f"{artifacts}/serving", tmp_path / "reader" / "feeds.duckdb")
    assert fetched.generation_id == generation
    local = _feed_rows(disks[publish_step.worker] / "serving" / "feeds.duckdb")
    assert local.height > 0 and local.equals(_feed_rows(tmp_path / "reader" / "feeds.duckdb"))
    # ...built from both shards, each written by a worker to the bucket.
    shard_rows = [read_parquet(f"{artifacts}/feeds/shards/shard-{key}.parquet") for key in SHARDS]
    assert local.height == sum(frame.height for frame in shard_rows)

    print(
        f"e2e: {len(runs)} runs, {sum(len(s) for s in steps.values())} steps on "
        f"{sorted({s.worker for v in steps.values() for s in v.values()})}, "
        f"{local.height} feed rows, {elapsed:.0f} s ({', '.join(timings)})"
    )
