"""What tests of Celery runs share beside the workers (tests/celery_workers.py): the
instance folder, the workers' environment, and which worker ran a step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery_workers import BIN, ROOT, celery_steps, celery_workers

__all__ = ["ROOT", "celery_workers", "shared_instance", "worker_env", "worker_of_step"]


def shared_instance(home: Path) -> Path:
    """A Dagster instance folder at `home` with the project's dagster.yaml (SQLite storage),
    opened once here: its tables are created before the workers and the runs open it side
    by side (two processes creating them at once collide)."""
    import shutil

    import dagster as dg

    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / ".dagster_home" / "dagster.yaml", home / "dagster.yaml")
    dg.DagsterInstance.from_config(str(home)).dispose()
    return home


def worker_env(home: Path, broker: str) -> dict[str, str]:
    """What a worker machine and the machine that starts runs share: this process's
    environment (storage root, source, shards), the instance, and the executor settings."""
    from feed_dagster.jobs.executors import CELERY_BROKER_VARIABLE, EXECUTOR_VARIABLE

    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        EXECUTOR_VARIABLE: "celery",
        CELERY_BROKER_VARIABLE: broker,
        "PYTHONPATH": str(ROOT),
        # dagster-celery starts the `celery` command found on PATH.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def worker_of_step(instance: Any, run_id: str, step: str, worker_pids: dict[str, int]) -> str:
    """The name of the worker that ran `step` of the run, proven from the run's events:
    dagster-celery's task names the worker that took the step, and the step's success was
    written by that worker's own process."""
    ran = celery_steps(instance, run_id)[step]
    assert ran.worker in worker_pids, ran
    assert ran.pid == worker_pids[ran.worker]
    return ran.worker
