"""user_feeds shards on Celery workers, chosen by configuration only: FEED_DAGSTER_EXECUTOR=celery
and the broker in FEED_DAGSTER_CELERY_BROKER. Proven with a real Redis (tests/servers.py) and
worker processes started by `dagster-celery worker start`."""

from __future__ import annotations

import os
import subprocess
import time
from types import SimpleNamespace

import dagster as dg
import polars as pl
import pytest
from celery_helpers import BIN, ROOT, celery_workers, shared_instance, worker_env, worker_of_step
from dagster_helpers import materialize
from polars.testing import assert_frame_equal
from servers import free_port

from feed_dagster.jobs.executors import (
    CELERY_BROKER_VARIABLE,
    EXECUTOR_VARIABLE,
    CeleryBrokerError,
    default_executor,
)
from feed_dagster.resources.storage import StorageResource

SHARDS = ("0", "1")


def test_the_broker_setting_is_named_when_unset_or_unreachable(monkeypatch) -> None:
    monkeypatch.setenv(EXECUTOR_VARIABLE, "celery")
    monkeypatch.delenv(CELERY_BROKER_VARIABLE, raising=False)
    with pytest.raises(ValueError, match=CELERY_BROKER_VARIABLE):
        default_executor()

    # Nothing listens there: refused at once, and the run stops before sending any step
    # instead of waiting on kombu's endless retries.
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    monkeypatch.setenv(CELERY_BROKER_VARIABLE, url)
    executor = default_executor()
    assert executor is not None and executor.name == "celery"
    started = time.monotonic()
    with pytest.raises(CeleryBrokerError) as caught:
        executor.executor_creation_fn(
            SimpleNamespace(executor_config={"broker": url, "backend": url})
        )
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert CELERY_BROKER_VARIABLE in message and "cannot be reached" in message
    assert "refused" in message.lower() and "s3cret" not in message


@pytest.mark.slow
def test_user_feeds_shards_run_on_celery_workers(data_dir, tmp_path, monkeypatch, redis_url):
    # The tiny world's tables (the feeds fall back to the untrained scorer without models).
    materialize(dg.AssetSelection.groups("raw", "social_graph"), raise_on_error=True)

    home = shared_instance(tmp_path / "dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    logs = tmp_path / "logs"
    logs.mkdir()
    env = worker_env(home, redis_url)
    storage = StorageResource(root=str(data_dir))
    names = ["feed-shard-a", "feed-shard-b"]
    with celery_workers(names, env, logs) as worker_pids:
        # Each shard is its own run, as the schedule and the sensor start them; both at once.
        runs = {
            key: subprocess.Popen(
                [
                    str(BIN / "dagster"),
                    "asset",
                    "materialize",
                    "-m",
                    "feed_dagster.definitions",
                    "--select",
                    "user_feeds",
                    "--partition",
                    key,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
            for key in SHARDS
        }
        outputs = {key: run.communicate(timeout=240)[0].decode() for key, run in runs.items()}
        run_pids = {run.pid for run in runs.values()}
        for key, run in runs.items():
            assert run.returncode == 0, outputs[key]
        celery_feeds = {key: pl.read_parquet(storage.shard_path(key)) for key in SHARDS}

    instance = dg.DagsterInstance.get()
    try:
        runs_kept = instance.get_runs()
        assert sorted(r.tags["dagster/partition"] for r in runs_kept) == list(SHARDS)
        assert {r.status for r in runs_kept} == {dg.DagsterRunStatus.SUCCESS}
        for run in runs_kept:
            # The step ran in a worker's process, not in the process that ran the job (nor
            # in this one).
            worker = worker_of_step(instance, run.run_id, "user_feeds", worker_pids)
            assert worker_pids[worker] not in run_pids | {os.getpid()}
    finally:
        instance.dispose()
    # The workers' own logs name the step they ran.
    assert any("user_feeds" in (logs / f"{n}.log").read_text() for n in names)

    # The same shards in this process (execute_in_process: the embedded path) give the
    # same feeds, row for row.
    for key in SHARDS:
        materialize(dg.AssetSelection.assets("user_feeds"), key, raise_on_error=True)
        embedded = pl.read_parquet(storage.shard_path(key))
        assert celery_feeds[key].height > 0
        assert_frame_equal(celery_feeds[key], embedded)
