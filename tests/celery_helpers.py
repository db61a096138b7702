"""Celery workers for tests: real `dagster-celery worker start` processes on the broker of
tests/servers.py's Redis, in the environment a test gives them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _children(pid: int) -> set[int]:
    """The processes `pid` started (Linux), recursively: dagster-celery's command starts the
    `celery` worker as a child process."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            found |= {int(child), *_children(int(child))}
    return found


@contextlib.contextmanager
def celery_workers(names: list[str], env: dict[str, str], logs: Path) -> Iterator[dict[str, int]]:
    """One `dagster-celery worker start` per name, each a single process (solo pool) in a
    session of its own; yields {name: pid of the process that runs the tasks} once every
    worker says it is ready, and stops them all after, also when the test failed."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in names:
            with (logs / f"{name}.log").open("wb") as out:
                procs[name] = subprocess.Popen(
                    [
                        str(BIN / "dagster-celery"),
                        "worker",
                        "start",
                        "-A",
                        "dagster_celery.app",
                        "-y",
                        str(ROOT / "deploy" / "celery" / "celery.yaml"),
                        "-n",
                        name,
                        "-l",
                        "INFO",
                        "--",
                        "--pool=solo",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,
                )
        deadline = time.monotonic() + 90
        waiting = set(names)
        while waiting:
            for name in list(waiting):
                assert procs[name].poll() is None, (logs / f"{name}.log").read_text()
                if " ready." in (logs / f"{name}.log").read_text():
                    waiting.discard(name)
            assert time.monotonic() < deadline, f"workers {waiting} not ready in 90 s"
            time.sleep(0.3)
        yield {name: max(_children(proc.pid)) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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
    events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event]
    (handed,) = [
        e.engine_event_data.metadata["Celery worker"].value
        for e in events
        if e.event_type_value == "ENGINE_EVENT" and "Celery worker" in e.engine_event_data.metadata
    ]
    name = handed.split("@")[0]
    assert name in worker_pids, handed
    (success,) = [e for e in events if e.event_type_value == "STEP_SUCCESS"]
    assert success.step_key == step
    assert success.pid == worker_pids[name]
    return name
